"""No code runs from data: a payload that would create a marker folder, planted in every format
we read (UNITER img_db msgpack and npz values, npz dumps, txt_db, RefCOCO pickles, checkpoints on
every load path), is refused naming the store/file and the key, and the marker never appears."""
from __future__ import annotations

import io
import os
import pickle

import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch

from tests.test_import_captions import META, vqa_records, write_txt_db
from tests.test_import_features import uniter_dump, write_img_db
from vlframe.data.importers.common import DataFormatError
from vlframe.data.importers.features import import_npz_dir, import_uniter_img_db
from vlframe.data.importers.tasks import load_plain_pickle
from vlframe.data.importers.uniter_txt import import_uniter_txt_db


class Payload:
    """Unpickling this calls os.mkdir(marker): the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _object_array(marker: str) -> np.ndarray:
    a = np.empty(1, dtype=object)
    a[0] = Payload(marker)
    return a


def _evil_msgpack(d: dict, marker: str) -> bytes:
    return msgpack.packb({**d, "conf": _object_array(marker)}, default=msgpack_numpy.encode, use_bin_type=True)


def test_the_payload_is_real(tmp_path):
    """msgpack-numpy's own decoder (what the importers used) runs the payload: the test can fail."""
    marker = str(tmp_path / "ran")
    msgpack.unpackb(_evil_msgpack({"x": 1}, marker), object_hook=msgpack_numpy.decode, raw=False)
    assert os.path.isdir(marker)


@pytest.mark.parametrize("compressed", [False, True])
def test_img_db_payload_is_refused(tmp_path, compressed):
    marker = str(tmp_path / "ran")
    rng = np.random.default_rng(0)
    dumps = {"a.npz": uniter_dump(rng, 10), "b.npz": uniter_dump(rng, 12)}
    if compressed:  # an npz value holding a pickled object array
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=True, **{**dumps["b.npz"], "conf": _object_array(marker)})
        evil = buf.getvalue()
    else:
        evil = _evil_msgpack(dumps["b.npz"], marker)
    db = write_img_db(tmp_path, dumps, compressed=compressed, values={"b.npz": evil})
    with pytest.raises(DataFormatError, match=rf"{db}: record 'b\.npz': "):
        import_uniter_img_db(db, tmp_path / "store")
    assert not os.path.exists(marker)
    report = import_uniter_img_db(db, tmp_path / "store2", skip_bad=True)  # and it can be skipped
    assert report.written == 1 and report.total_skipped == 1
    assert not os.path.exists(marker)


def test_img_db_refuses_other_non_plain_values(tmp_path):
    rng = np.random.default_rng(1)
    d = uniter_dump(rng, 10)
    structured = np.zeros(10, dtype=[("a", "<f4"), ("b", "<i4")])
    values = {"b.npz": msgpack.packb({**d, "conf": structured}, default=msgpack_numpy.encode, use_bin_type=True)}
    db = write_img_db(tmp_path, {"a.npz": d, "b.npz": d}, values=values)
    with pytest.raises(DataFormatError, match=r"record 'b\.npz': refused value: an array of kind 'V'"):
        import_uniter_img_db(db, tmp_path / "store")


def test_npz_dump_payload_is_refused(tmp_path):
    marker = str(tmp_path / "ran")
    folder = tmp_path / "npz"
    folder.mkdir()
    rng = np.random.default_rng(2)
    np.savez(folder / "a.npz", **uniter_dump(rng, 10))
    np.savez(folder / "b.npz", allow_pickle=True, **{**uniter_dump(rng, 10), "conf": _object_array(marker)})
    with pytest.raises(DataFormatError, match=r"b\.npz: file: unreadable npz value"):
        import_npz_dir(folder, tmp_path / "store")
    assert not os.path.exists(marker)


def test_txt_db_payload_is_refused(tmp_path):
    marker = str(tmp_path / "ran")
    records = vqa_records()
    key = next(iter(records))
    evil = lz4.frame.compress(msgpack.packb({**records[key], "input_ids": _object_array(marker)},
                                            default=msgpack_numpy.encode, use_bin_type=True))
    db = write_txt_db(tmp_path / "txt.db", records, values={key: evil})
    with pytest.raises(DataFormatError, match=rf"txt\.db: record '{key}': refused value: an object array"):
        import_uniter_txt_db(db, tmp_path / "store")
    assert not os.path.exists(marker)
    assert META["bert"] == "bert-base-cased"


def test_refs_pickle_payload_is_refused(tmp_path):
    marker = str(tmp_path / "ran")
    path = tmp_path / "refs(unc).p"
    with open(path, "wb") as f:
        pickle.dump([{"ref_id": 0, "x": Payload(marker)}], f, protocol=2)
    with pytest.raises(DataFormatError, match=r"refs\(unc\)\.p: refused global posix\.mkdir|refused global os\.mkdir"):
        load_plain_pickle(path)
    assert not os.path.exists(marker)


def _checkpoint_loaders():
    from projects.uniter.uniter.convert import convert_file, read_state_dict
    from vlframe.engine import checkpoint as ckpt

    return {
        "resume/init_from (checkpoint.load)": lambda p, out: ckpt.load(p),
        "preflight (checkpoint.check_file)": lambda p, out: ckpt.check_file(p, what="train.init_from"),
        "model.pretrained / converter input (read_state_dict)": lambda p, out: read_state_dict(p),
        "convert_checkpoint": lambda p, out: convert_file(p, out, source="original", target="vlframe"),
    }


@pytest.mark.parametrize("name", list(_checkpoint_loaders()))
def test_checkpoint_payload_is_refused(tmp_path, name):
    marker = str(tmp_path / "ran")
    path = str(tmp_path / "ckpt_0000001.pt")
    torch.save({"step": 1, "model": {"w": torch.zeros(1)}, "x": Payload(marker)}, path)
    with pytest.raises((ValueError, RuntimeError), match=r"ckpt_0000001\.pt"):
        _checkpoint_loaders()[name](path, str(tmp_path / "out.pt"))
    assert not os.path.exists(marker)


def test_our_region_store_never_unpickles(tmp_path):
    """Our own stores decode msgpack without object hooks: a msgpack-numpy object array planted
    in a record is a corrupt record, not code."""
    import lmdb

    from tests.test_stores import C, D, _image
    from vlframe.data.stores import RegionStore, RegionStoreWriter

    marker = str(tmp_path / "ran")
    path = tmp_path / "regions"
    with RegionStoreWriter(path, feat_dim=D, num_labels=C) as w:
        w.add("img0", **_image(np.random.default_rng(0), 5))
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        rec = msgpack.unpackb(txn.get(b"img0"), raw=False)
        rec["features"] = msgpack_numpy.encode(_object_array(marker))
        txn.put(b"img0", msgpack.packb(rec, use_bin_type=True))
    env.close()
    with pytest.raises(ValueError, match=r"regions: img_id 'img0'"):
        RegionStore(path).get("img0")
    assert not os.path.exists(marker)
