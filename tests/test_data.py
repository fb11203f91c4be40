"""Data: byte tokens, a file corpus split by file, and a deterministic, checkpointable grain
pipeline in which each process reads only its own rows of every global batch."""

import jax
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax.train import data


def batch_at(dataset, i: int) -> dict[str, np.ndarray]:
    """Batch ``i`` of a dataset (grain types an element as possibly None; ours never is)."""
    batch = dataset[i]
    assert batch is not None
    return batch


@pytest.fixture(scope="module")
def stream():
    return np.arange(10_000, dtype=np.uint16) % 251


def test_tokenizer_round_trips_unicode():
    tok = data.ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.decode([*ids, tok.EOS, tok.PAD]) == text  # special tokens are not text
    assert tok.vocab_size == 259


def test_default_corpus_is_the_standard_library():
    files = data.stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_corpus_splits_by_file(tmp_path):
    for i in range(40):
        (tmp_path / f"mod{i}.py").write_text(f"x = {i}\n" * 20)
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    corpus = data.load_corpus([tmp_path])
    assert corpus.train_files + corpus.val_files == 40  # hidden and binary files left out
    assert corpus.val_files >= 1 and corpus.train_files > corpus.val_files
    tok = data.ByteTokenizer()
    assert (corpus.train == tok.EOS).sum() == corpus.train_files
    assert tok.decode(corpus.val[corpus.val != tok.EOS]).count("x = ") == 20 * corpus.val_files
    again = data.load_corpus([tmp_path])
    np.testing.assert_array_equal(again.val, corpus.val)


def test_a_single_file_is_split_by_position(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("a" * 900 + "b" * 100)
    corpus = data.load_corpus([f], val_fraction=0.1)
    assert corpus.train_files == corpus.val_files == 1
    assert data.ByteTokenizer().decode(corpus.val) == "b" * 100


def test_missing_data_path_names_the_fix(tmp_path):
    with pytest.raises(data.DataError, match="neither a file nor a folder") as err:
        data.load_corpus([tmp_path / "nope"])
    assert "Fix" in str(err.value)


def test_too_little_text_for_a_batch(stream):
    with pytest.raises(data.DataError, match="lower --batch / --seq"):
        data.train_dataset(stream[:100], seq_len=32, global_batch=8, seed=0)


def test_windows_are_next_token_pairs(stream):
    batch = batch_at(data.train_dataset(stream, seq_len=16, global_batch=4, seed=0), 0)
    assert batch["inputs"].shape == batch["targets"].shape == (4, 16)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    for row, idx in zip(batch["inputs"], batch["index"]):
        np.testing.assert_array_equal(row, stream[idx * 16 : idx * 16 + 16])


def test_every_window_once_per_epoch_in_a_new_order_each_epoch(stream):
    n = data.num_windows(stream, 32)  # 312 windows
    ds = data.train_dataset(stream, seq_len=32, global_batch=8, seed=1)
    per_epoch = n // 8
    first = np.concatenate([batch_at(ds, i)["index"] for i in range(per_epoch)])
    assert len(set(first.tolist())) == len(first) == per_epoch * 8
    second = np.concatenate([batch_at(ds, i)["index"] for i in range(per_epoch + 1, 2 * per_epoch)])
    assert not np.array_equal(first[8 : 8 + len(second)], second)


def test_same_seed_same_order_other_seed_other_order(stream):
    a = data.train_dataset(stream, seq_len=32, global_batch=8, seed=0)
    b = data.train_dataset(stream, seq_len=32, global_batch=8, seed=0)
    c = data.train_dataset(stream, seq_len=32, global_batch=8, seed=1)
    np.testing.assert_array_equal(batch_at(a, 3)["inputs"], batch_at(b, 3)["inputs"])
    assert not np.array_equal(batch_at(a, 3)["index"], batch_at(c, 3)["index"])


def test_processes_read_disjoint_rows_that_make_up_the_global_batch(stream):
    whole = data.train_dataset(stream, seq_len=32, global_batch=8, seed=0)
    first = data.train_dataset(stream, seq_len=32, global_batch=8, seed=0, rows=(0, 4))
    second = data.train_dataset(stream, seq_len=32, global_batch=8, seed=0, rows=(4, 8))
    for i in range(5):
        np.testing.assert_array_equal(
            np.concatenate([batch_at(first, i)["inputs"], batch_at(second, i)["inputs"]]), batch_at(whole, i)["inputs"]
        )
        assert data.batch_digest(batch_at(first, i)) == data.batch_digest(batch_at(whole, i))


def test_iterator_state_resumes_exactly(stream):
    ds = data.train_dataset(stream, seq_len=32, global_batch=8, seed=0)
    it = data.iterator(ds)
    for _ in range(3):
        next(it)
    saved = it.get_state()
    expected = [next(it)["index"] for _ in range(4)]
    resumed = data.iterator(ds, saved)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["index"], want)


def test_validation_batches_are_fixed_and_ordered(stream):
    val = data.val_batches(stream, seq_len=32, global_batch=8, num_batches=3)
    assert len(val) == 3
    np.testing.assert_array_equal(val[1]["index"], np.arange(8, 16))
    assert data.val_batches(stream[:50], seq_len=32, global_batch=8, num_batches=3) == []


def test_rows_and_global_arrays_follow_the_batch_sharding(devices, stream):
    plan = mj.Plan(mj.make_mesh(data=2, fsdp=2, tensor=2), mj.rules("dp_fsdp_tp"))
    sharding = plan.activation_sharding(("batch", "seq"))
    assert data.local_rows(sharding, 8, 32) == (0, 8)  # one process holds every row
    batch = batch_at(data.train_dataset(stream, seq_len=32, global_batch=8, seed=0), 0)
    arrays = data.to_global(batch, {"inputs": sharding, "targets": sharding}, 8)
    assert arrays["inputs"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(arrays["inputs"]), batch["inputs"])
    assert jax.tree.leaves(arrays)[0].shape == (8, 32)
