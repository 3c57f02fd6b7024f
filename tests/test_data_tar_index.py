"""Tar shard index: agreement with `tarfile`, long/pax names, grouping, caching, truncation, speed."""
import io
import os
import tarfile
import time

import numpy as np
import pytest

from blip3o_jax.data import sources, tar_index
from blip3o_jax.data.synthetic import write_tar


def _add(tar, name, data, type_=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type = type_
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_index_matches_tarfile_and_groups_by_key(tmp_path, fmt):
    rng = np.random.default_rng(0)
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 chars: GNU long name / pax path / ustar prefix
    names = ["a.b/s1.jpg", "a.b/s1.txt", "s2.jpg", "s2.seg.png", "s2.txt", "noext", f"{long_dir}/s3.jpg",
             f"{long_dir}/s3.txt", "s4.txt"]
    if fmt == tarfile.PAX_FORMAT:
        names.append("ünï/s5.txt")  # non-ASCII name -> pax header
    path = str(tmp_path / "x.tar")
    payloads = {}
    with tarfile.open(path, "w", format=fmt) as tar:
        _add(tar, "somedir", b"", tarfile.DIRTYPE)
        for n in names:
            payloads[n] = rng.bytes(int(rng.integers(0, 1500)))
            _add(tar, n, payloads[n])
    ix = tar_index.build_index(path)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile() and "." in m.name]
    assert list(ix.members()) == expected
    keys = [ix.sample_key(j) for j in range(len(ix))]
    assert keys == ["a.b/s1", "s2", f"{long_dir}/s3", "s4"] + (["ünï/s5"] if fmt == tarfile.PAX_FORMAT else [])
    assert [f for f, _, _ in ix.sample_members(1)] == ["jpg", "seg.png", "txt"]
    with open(path, "rb") as f:
        data = f.read()
    for name, off, size in ix.members():
        assert data[off : off + size] == payloads[name]


def test_member_names_are_never_paths(tmp_path):
    sub = tmp_path / "shards"
    sub.mkdir()
    shard = str(sub / "evil.tar")
    write_tar(shard, [("../escape", {"jpg": b"x" * 10, "txt": "caption"}), ("/abs/k", {"txt": "t"})])
    src = sources.TarShardSource(shard)
    assert len(src) == 2
    assert src[0].key == "../escape" and src[0].text == b"caption"
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # nothing extracted next to or above the shard
    assert sorted(os.listdir(sub)) == ["evil.tar", "evil.tar.idx"]


def test_index_is_fast_cached_and_invalidated(tmp_path):
    shard = str(tmp_path / "big.tar")
    write_tar(shard, [(f"{i:06d}", {"jpg": b"\xff" * 700, "txt": f"caption {i}", "json": "{}"}) for i in range(1000)])
    tar_index.STATS.update(built=0, reused=0)
    t0 = time.perf_counter()
    ix = tar_index.get_index(shard)
    build_s = time.perf_counter() - t0
    assert len(ix) == 1000 and tar_index.STATS == {"built": 1, "reused": 0}
    assert build_s < 0.5, f"indexing 1000 samples took {build_s:.3f}s"
    t0 = time.perf_counter()
    again = tar_index.get_index(shard)
    reuse_s = time.perf_counter() - t0
    assert tar_index.STATS == {"built": 1, "reused": 1}
    assert reuse_s < build_s and isinstance(again.member_offset, np.memmap)
    assert list(again.members()) == list(ix.members())
    print(f"index 1000-sample shard: build {build_s * 1e3:.1f} ms, reuse {reuse_s * 1e3:.1f} ms")
    # a changed shard (size/mtime) invalidates the cached index
    write_tar(shard, [(f"{i:06d}", {"jpg": b"\xff" * 10, "txt": "c"}) for i in range(10)])
    os.utime(shard, ns=(1, 1))
    assert len(tar_index.get_index(shard)) == 10 and tar_index.STATS["built"] == 2


def test_cache_dir(tmp_path):
    shard = str(tmp_path / "s.tar")
    cache = str(tmp_path / "cache")
    write_tar(shard, [("k", {"jpg": b"1", "txt": "c"})])
    tar_index.get_index(shard, cache)
    assert not os.path.exists(shard + ".idx")
    assert len(os.listdir(cache)) == 1 and os.listdir(cache)[0].endswith("-s.tar.idx")
    assert tar_index.load_index(tar_index.index_path(shard, cache), shard) is not None


def test_truncated_shard_keeps_complete_samples(tmp_path):
    shard = str(tmp_path / "t.tar")
    write_tar(shard, [(f"k{i}", {"jpg": bytes([i]) * 3000, "txt": f"c{i}"}) for i in range(5)])
    ix = tar_index.build_index(shard)
    last_jpg_offset = ix.sample_members(4)[0][1]
    with open(shard, "r+b") as f:
        f.truncate(last_jpg_offset + 1000)  # cut inside the last sample's image
    ix = tar_index.build_index(shard)
    assert ix.truncated and len(ix) == 5
    src = sources.TarShardSource(shard)
    assert src[3].image == bytes([3]) * 3000
    with pytest.raises(sources.BadSampleError) as e:
        src[4]
    assert e.value.reason == "truncated" and e.value.key == "k4" and e.value.shard == shard


def test_not_a_tar_and_missing_files(tmp_path):
    bad = tmp_path / "junk.tar"
    bad.write_bytes(b"hello" * 300)
    with pytest.raises(tar_index.TarIndexError):
        tar_index.build_index(str(bad))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        sources.TarShardSource(str(tmp_path / "nothing-*.tar"))


def test_concurrent_reads_with_descriptor_eviction(tmp_path):
    """Decoding threads read many shards through a small descriptor cache: every read returns the right bytes."""
    import concurrent.futures

    for s in range(6):
        write_tar(str(tmp_path / f"c-{s}.tar"), [(f"{s}-{i}", {"jpg": bytes([s, i]) * 500, "txt": f"{s} {i}"})
                                                 for i in range(20)])
    src = sources.TarShardSource(str(tmp_path / "c-*.tar"))
    src._files = sources.FileHandles(limit=2)  # force constant eviction

    def check(seed):
        rng = np.random.default_rng(seed)
        for r in rng.integers(0, len(src), 200):
            s, i = divmod(int(r), 20)
            sample = src[r]
            assert sample.image == bytes([s, i]) * 500 and sample.text == f"{s} {i}".encode()
        return True

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(8)))
