"""The improvement loop: fine-tune the best model on new data (growing its class list by category id) and
promote the result only if it is better on a fixed held-out split (`python -m improve`)."""
