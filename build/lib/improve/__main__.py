import sys

from improve.round import main

sys.exit(main())
