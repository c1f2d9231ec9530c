"""The sample store: one Zarr v3 group per source, the contract between `prepare` and the stream.

Layout (DESIGN.md):

    attrs: biofm_store, source, created, n_samples, rows_per_chunk, modalities, tasks, arrays, complete
    index/sample_id [N] str   index/subject_id [N] str   index/split [N] str (train / val / test)
    labels/<task>   [N] or [N, C] float32, NaN = missing
    <modality>/<array>            fixed per sample: [N, ...]
    <modality>/<array> + .offsets ragged per sample: rows [M, ...] and int64 offsets [N + 1]
    <modality>/present [N] bool   whether a sample has the modality at all

`format.py` (paths, ragged columns, codecs), `writer.py` (StoreWriter), `reader.py` (Store), `splits.py`.
Writes go to committed parts first (`_parts/<batch>`, committed by an attribute written last), so an
interrupted `prepare` resumes and never exposes half a sample; `finalize` then writes every array once,
rows in one seeded random permutation, and marks the store complete.
"""

from biofm.platform.errors import StoreError
from biofm.platform.integrity import is_local
from biofm.platform.store.format import (
    FORMAT_VERSION,
    INDEX_ARRAYS,
    SPLITS,
    Column,
    Ragged,
    compressors_for,
    concat_rows,
    open_root,
    slice_rows,
    take_rows,
)
from biofm.platform.store.reader import RawChunks, Store
from biofm.platform.store.splits import check_subject_splits, subject_splits
from biofm.platform.store.writer import StoreWriter, unfinished_settings

__all__ = [
    "FORMAT_VERSION",
    "INDEX_ARRAYS",
    "SPLITS",
    "Column",
    "Ragged",
    "RawChunks",
    "Store",
    "StoreError",
    "StoreWriter",
    "check_subject_splits",
    "compressors_for",
    "concat_rows",
    "is_local",
    "open_root",
    "slice_rows",
    "subject_splits",
    "take_rows",
    "unfinished_settings",
]
