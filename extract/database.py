"""The attributes database: models, images, the attributes a model found in them, skipped files, and the
rounds of the improvement loop.

`open_database(target)` takes a file path (SQLite, Python's sqlite3) or a `postgresql://` URL (PostgreSQL
through psycopg 3, imported only then, so SQLite never needs it). Both backends share one class and one
schema; they differ in the placeholder and the auto-increment key (`Dialect`) and in how a transaction is
opened. Every statement is parameterised.

Guarantees the extraction relies on:
- An image is done for a model when its `extractions (model_id, image_id)` row exists. That row, the image row
  and its attribute rows are written in one transaction, so a crash leaves either all of them or none.
- Unique constraints make every write idempotent: models by checkpoint sha256, images by content sha256,
  extractions by (model, image), attributes by (model, image, detection_index); inserts skip what exists.
- The schema carries its version (`schema_version`); an older one is migrated in one transaction, a newer one
  is refused, because this code would misread it.

See docs/attributes.md for the tables and example queries.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from extract.schema import MIGRATIONS, POSTGRESQL, SCHEMA_VERSION, SQLITE, Dialect

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# Any fixed number: PostgreSQL serialises concurrent schema creation on this advisory lock.
_MIGRATION_LOCK_KEY = 7_431_002


class SchemaVersionError(RuntimeError):
    """The database was written by a newer version of this code."""


@dataclass(frozen=True)
class DetectionAttribute:
    """A property of one detection beyond its label: kind ("colour"), value ("red") and the share of the object
    it covers (0..1; None when the kind has no share)."""

    kind: str
    value: str
    share: float | None = None


@dataclass(frozen=True)
class Detection:
    """One attribute found in an image: a class of the model with its score and pixel box (x1, y1, x2, y2),
    and the properties found of it (at most one per kind)."""

    name: str
    category_id: int
    score: float
    box: tuple[float, float, float, float]
    attributes: tuple[DetectionAttribute, ...] = ()


@dataclass(frozen=True)
class ImageExtraction:
    """A model's detections on one image; `source` is its file path or shard key."""

    source: str
    content_sha256: str
    width: int
    height: int
    detections: list[Detection]


@dataclass(frozen=True)
class SkippedImage:
    source: str
    reason: str
    detail: str


# Statements are written with ? placeholders (turned into %s for psycopg) and shared by both backends.
_REGISTER_MODEL = """
    INSERT INTO models (checkpoint_sha256, checkpoint_path, architecture, class_names, test_map,
                        test_ap_per_class, created_at)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (checkpoint_sha256) DO UPDATE SET
        test_map = COALESCE(models.test_map, excluded.test_map),
        test_ap_per_class = COALESCE(models.test_ap_per_class, excluded.test_ap_per_class)
    RETURNING id"""
_RECORD_ROUND = """
    INSERT INTO improvement_rounds (round_index, base_model_id, candidate_model_id, data, schedule, base_map,
                                    candidate_map, promoted, margin, created_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"""
_INSERT_IMAGE = """
    INSERT INTO images (content_sha256, source, width, height) VALUES (?, ?, ?, ?)
    ON CONFLICT (content_sha256) DO NOTHING"""
_INSERT_EXTRACTION = """
    INSERT INTO extractions (model_id, image_id, score_threshold, max_detections, num_attributes, created_at)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (model_id, image_id) DO NOTHING RETURNING id"""
_INSERT_ATTRIBUTE = """
    INSERT INTO attributes (model_id, image_id, detection_index, name, category_id, score, x1, y1, x2, y2)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_INSERT_DETECTION_ATTRIBUTE = """
    INSERT INTO detection_attributes (model_id, image_id, detection_index, kind, value, share)
    VALUES (?, ?, ?, ?, ?, ?)"""
_UPSERT_SKIPPED = """
    INSERT INTO skipped (source, reason, detail, seen_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (source) DO UPDATE SET reason = excluded.reason, detail = excluded.detail,
                                       seen_at = excluded.seen_at"""
# "CAST(? AS BIGINT) IS NULL": PostgreSQL cannot infer the type of a bare NULL parameter.
# The colour of a detection, joined to its row of `attributes a` (NULL columns when it has none).
_COLOUR_OF_DETECTION = """
    LEFT JOIN detection_attributes c ON c.model_id = a.model_id AND c.image_id = a.image_id
        AND c.detection_index = a.detection_index AND c.kind = 'colour'"""
_ATTRIBUTES_OF_IMAGE = """
    SELECT a.model_id, i.source, i.content_sha256, a.detection_index, a.name, a.category_id, a.score,
           a.x1, a.y1, a.x2, a.y2, c.value AS colour, c.share AS colour_share
    FROM attributes a JOIN images i ON i.id = a.image_id""" + _COLOUR_OF_DETECTION + """
    WHERE (i.source = ? OR i.content_sha256 = ?) AND (CAST(? AS BIGINT) IS NULL OR a.model_id = ?)
    ORDER BY a.model_id, a.detection_index"""
_IMAGES_WITH_ATTRIBUTE = """
    SELECT i.source, i.content_sha256, a.model_id, MAX(a.score) AS best_score, COUNT(*) AS detections
    FROM attributes a JOIN images i ON i.id = a.image_id""" + _COLOUR_OF_DETECTION + """
    WHERE a.name = ? AND a.score >= ? AND (CAST(? AS BIGINT) IS NULL OR a.model_id = ?)
          AND (CAST(? AS TEXT) IS NULL OR c.value = ?)
    GROUP BY i.source, i.content_sha256, a.model_id
    ORDER BY best_score DESC, i.source"""
_ATTRIBUTE_COUNTS = """
    SELECT a.model_id, a.name, COUNT(*) AS detections, COUNT(DISTINCT a.image_id) AS images,
           AVG(a.score) AS mean_score
    FROM attributes a WHERE CAST(? AS BIGINT) IS NULL OR a.model_id = ?
    GROUP BY a.model_id, a.name ORDER BY a.model_id, detections DESC, a.name"""
_COLOUR_COUNTS = """
    SELECT a.model_id, a.name, c.value AS colour, COUNT(*) AS detections, AVG(c.share) AS mean_share
    FROM attributes a""" + _COLOUR_OF_DETECTION + """
    WHERE CAST(? AS BIGINT) IS NULL OR a.model_id = ?
    GROUP BY a.model_id, a.name, c.value ORDER BY a.model_id, a.name, detections DESC, c.value"""
_DONE_IMAGES = """
    SELECT i.content_sha256 FROM extractions e JOIN images i ON i.id = e.image_id WHERE e.model_id = ?"""


def open_database(url_or_path: str | Path) -> AttributesDB:
    """Connect to a SQLite file (created if missing) or a postgresql:// URL; create or migrate the schema."""
    target = str(url_or_path)
    if target.startswith(POSTGRES_SCHEMES):
        try:
            import psycopg
        except ImportError as error:
            raise RuntimeError(
                "a postgresql:// database needs the psycopg package: pip install 'psycopg[binary]'"
            ) from error
        connection = psycopg.connect(target, autocommit=True)
        return AttributesDB(connection, POSTGRESQL, display_name(target))
    path = Path(target)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"database {path}: directory {path.parent} does not exist")
    # isolation_level=None: no implicit transactions; every write goes through AttributesDB.transaction().
    connection = sqlite3.connect(path, isolation_level=None, timeout=60)
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA journal_mode = WAL")
    return AttributesDB(connection, SQLITE, str(path))


def display_name(url_or_path: str | Path) -> str:
    """The database's path or URL, fit for printing: a URL's password is masked."""
    url = str(url_or_path)
    parts = urlsplit(url)
    if not url.startswith(POSTGRES_SCHEMES) or parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AttributesDB:
    """One connection to the attributes database (`name`: its file, or its URL without the password).

    Not thread-safe; in a multi-process job one process should write (the extraction gathers to rank 0).
    """

    def __init__(self, connection: Any, dialect: Dialect, name: str):
        self.connection, self.dialect, self.name = connection, dialect, name
        self._ensure_schema()

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> AttributesDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- plumbing ------------------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction: committed when the block ends, rolled back when it raises."""
        if self.dialect is POSTGRESQL:
            with self.connection.transaction(), self.connection.cursor() as cursor:
                yield cursor
            return
        cursor = self.connection.cursor()
        # IMMEDIATE takes the write lock now, so two writers queue instead of failing at their first write.
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")

    def _execute(self, cursor: Any, statement: str, params: Sequence[Any] = ()) -> Any:
        cursor.execute(statement.replace("?", self.dialect.placeholder), tuple(params))
        return cursor

    def _query(self, statement: str, params: Sequence[Any] = ()) -> list[dict]:
        """Rows of one read as dicts (autocommit: a single statement sees one consistent snapshot)."""
        cursor = self.connection.cursor()
        try:
            self._execute(cursor, statement, params)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def _ensure_schema(self) -> None:
        with self.transaction() as cursor:
            if self.dialect is POSTGRESQL:
                # Serialises schema creation between processes that open a new database at once.
                self._execute(cursor, "SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_KEY,))
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = cursor.execute("SELECT version FROM schema_version").fetchall()
            if len(rows) > 1:
                raise SchemaVersionError(f"{self.name}: schema_version holds {len(rows)} rows, expected one")
            version = rows[0][0] if rows else 0
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.name}: the attributes database has schema version {version}, newer than the "
                    f"{SCHEMA_VERSION} this code knows; use the newer code that wrote it, or another database"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    cursor.execute(statement.format(id=self.dialect.id_column))
            if not rows:
                self._execute(cursor, "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                self._execute(cursor, "UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        return self._query("SELECT version FROM schema_version")[0]["version"]

    # ---- models and improvement rounds (the improvement loop's API) ----------------------------------------
    def register_model(
        self, checkpoint_path: Path, architecture: str, class_names: list[str], test_map: float | None,
        test_ap_per_class: Mapping[str, Mapping[str, float]] | None = None,
    ) -> int:
        """The model's id, added if its checkpoint's sha256 is new; a later test mAP or per-class AP fills a
        NULL one. `test_ap_per_class` is {class name: {"AP": .., "AP50": .., "gt_boxes": ..}}, stored as JSON
        with null for an AP that is undefined (NaN: no ground truth of that class in the test split)."""
        per_class = None
        if test_ap_per_class:
            per_class = json.dumps({name: {key: None if value != value else value for key, value in row.items()}
                                    for name, row in test_ap_per_class.items()}, allow_nan=False)
        params = (file_sha256(checkpoint_path), str(checkpoint_path), architecture,
                  json.dumps(list(class_names)), test_map, per_class, _now())
        with self.transaction() as cursor:
            return int(self._execute(cursor, _REGISTER_MODEL, params).fetchone()[0])

    def models(self) -> list[dict]:
        """Every model; `class_names` as a list, `test_ap_per_class` as a dict (None when not known)."""
        rows = self._query("SELECT * FROM models ORDER BY id")
        for row in rows:
            row["class_names"] = json.loads(row["class_names"])
            row["test_ap_per_class"] = json.loads(row["test_ap_per_class"] or "null")
        return rows

    def class_ap(self, model_id: int | None = None) -> list[dict]:
        """One row per model and class of the stored per-class test AP: model_id, name, then its values (AP,
        AP50, gt_boxes; None where undefined), in the order the evaluation reported the classes."""
        return [{"model_id": model["id"], "name": name, **values}
                for model in self.models() if model_id is None or model["id"] == model_id
                for name, values in (model["test_ap_per_class"] or {}).items()]

    def record_improvement_round(
        self, round_index: int, base_model_id: int | None, candidate_model_id: int, data: list[str],
        schedule: str, base_map: float | None, candidate_map: float, promoted: bool, margin: float,
    ) -> int:
        """Store one round of the improvement loop: its data, schedule, both mAPs and the decision."""
        params = (round_index, base_model_id, candidate_model_id, json.dumps(list(data)), schedule, base_map,
                  candidate_map, bool(promoted), margin, _now())
        with self.transaction() as cursor:
            return int(self._execute(cursor, _RECORD_ROUND, params).fetchone()[0])

    def improvement_rounds(self) -> list[dict]:
        """Every recorded round in insertion order, `data` as a list and `promoted` as a bool."""
        rows = self._query("SELECT * FROM improvement_rounds ORDER BY id")
        for row in rows:
            row["data"] = json.loads(row["data"])
            row["promoted"] = bool(row["promoted"])
        return rows

    # ---- extraction writes ---------------------------------------------------------------------------------
    def done_image_hashes(self, model_id: int) -> set[str]:
        """Content sha256 of every image this model has already been run on."""
        return {row["content_sha256"] for row in self._query(_DONE_IMAGES, (model_id,))}

    def write_batch(
        self,
        model_id: int,
        extractions: Sequence[ImageExtraction],
        skipped: Sequence[SkippedImage],
        score_threshold: float,
        max_detections: int,
        before_commit: Callable[[], None] | None = None,
    ) -> int:
        """Write one batch in one transaction; return how many images were new for this model.

        An image already extracted by this model is left as it is (its attributes are not written twice).
        `before_commit` runs inside the transaction after every insert (a test hook for crashes).
        """
        added = 0
        with self.transaction() as cursor:
            for image in extractions:
                added += self._insert_extraction(cursor, model_id, image, score_threshold, max_detections)
            for skip in skipped:
                self._execute(cursor, _UPSERT_SKIPPED, (skip.source, skip.reason, skip.detail, _now()))
            if before_commit is not None:
                before_commit()
        return added

    def _insert_extraction(self, cursor: Any, model_id: int, image: ImageExtraction,
                           score_threshold: float, max_detections: int) -> int:
        self._execute(cursor, _INSERT_IMAGE, (image.content_sha256, image.source, image.width, image.height))
        self._execute(cursor, "SELECT id FROM images WHERE content_sha256 = ?", (image.content_sha256,))
        image_id = int(cursor.fetchone()[0])
        params = (model_id, image_id, score_threshold, max_detections, len(image.detections), _now())
        if self._execute(cursor, _INSERT_EXTRACTION, params).fetchone() is None:
            return 0  # this model already did this image (same content under another name, or a re-run)
        cursor.executemany(
            _INSERT_ATTRIBUTE.replace("?", self.dialect.placeholder),
            [(model_id, image_id, index, d.name, d.category_id, d.score, *d.box)
             for index, d in enumerate(image.detections)],
        )
        cursor.executemany(
            _INSERT_DETECTION_ATTRIBUTE.replace("?", self.dialect.placeholder),
            [(model_id, image_id, index, attribute.kind, attribute.value, attribute.share)
             for index, d in enumerate(image.detections) for attribute in d.attributes],
        )
        return 1

    # ---- queries -------------------------------------------------------------------------------------------
    def attributes_of_image(self, source_or_sha256: str, model_id: int | None = None) -> list[dict]:
        """Attribute rows of the image with this source (path or shard key) or content sha256, with each
        detection's colour and colour_share (None for detections written without)."""
        return self._query(_ATTRIBUTES_OF_IMAGE, (source_or_sha256, source_or_sha256, model_id, model_id))

    def images_with_attribute(self, name: str, min_score: float = 0.0, model_id: int | None = None,
                              colour: str | None = None) -> list[dict]:
        """Images where `name` was detected (in `colour`, when given: "red" bottles), with the best score and
        the number of such detections."""
        return self._query(_IMAGES_WITH_ATTRIBUTE, (name, min_score, model_id, model_id, colour, colour))

    def colour_counts(self, model_id: int | None = None) -> list[dict]:
        """Per model, attribute name and colour: detections and the colour's mean share of the object
        (colour None: detections stored without a colour)."""
        return self._query(_COLOUR_COUNTS, (model_id, model_id))

    def attribute_counts(self, model_id: int | None = None) -> list[dict]:
        """Per model and attribute name: detections, images it appears in, mean score."""
        return self._query(_ATTRIBUTE_COUNTS, (model_id, model_id))

    def skipped(self) -> list[dict]:
        return self._query("SELECT source, reason, detail, seen_at FROM skipped ORDER BY source")
