"""nanovl.safetensors against the `safetensors` library and huggingface_hub (used here only, as oracles): tensors
and metadata survive the trip in both directions, our files are byte-identical to theirs, loading is a memory map,
every kind of corrupt file is refused with a message naming the problem, and saves are atomic."""

import gc
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file as lib_load
from safetensors.torch import save_file as lib_save

from nanovl import safetensors as st


def all_dtypes():
    """One small tensor per supported dtype, plus a scalar and two zero-element tensors, filled with values that
    are exact in every dtype (fp8 holds small integers exactly)."""
    out = {}
    for name, dtype in st._DTYPES.items():
        base = torch.arange(-3, 3).reshape(2, 3)
        if dtype == torch.bool:
            base = base > 0
        elif not dtype.is_floating_point and not dtype.is_signed:
            base = base + 3
        out[f"t.{name}"] = base.to(dtype)
    out["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    out["empty"] = torch.zeros(0, 4)
    out["empty.bool"] = torch.zeros(3, 0, dtype=torch.bool)
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        # compare bytes, so fp8/bf16/NaN compare exactly and uint64 needs no arithmetic torch may lack
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_dtypes_cover_the_format():
    # The torch in requirements has every dtype; an older one would silently shrink the round trips below.
    assert list(st._DTYPES) == ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
                                "U32", "F32", "F64", "I64", "U64"]
    # and each name means the dtype the safetensors library reads it as (the round trips below are built from our
    # table, so a name mapped to the wrong dtype, F8_E5M2 to e4m3 say, would pass them)
    from safetensors.torch import _TYPES
    assert st._DTYPES == {name: _TYPES[name] for name in st._DTYPES}


def test_we_read_what_the_library_writes(tmp_path):
    tensors, meta = all_dtypes(), {"format": "pt", "step": "7", "note": "héllo \"quoted\"\n"}
    lib_save(tensors, tmp_path / "lib.safetensors", metadata=meta)
    assert_same(st.load_file(tmp_path / "lib.safetensors"), tensors)
    assert st.metadata(tmp_path / "lib.safetensors") == meta


def test_library_reads_what_we_write(tmp_path):
    tensors = all_dtypes()
    st.save_file(tensors, tmp_path / "ours.safetensors", metadata={"a": "1", "b": "2"})
    assert_same(lib_load(tmp_path / "ours.safetensors"), tensors)


@pytest.mark.parametrize("meta", [None, {}, {"format": "pt"}, {"k": "ü \\ \"x\"\t\x01/\x7f"}])
def test_writer_is_byte_identical_to_the_library(tmp_path, meta):
    tensors = all_dtypes()
    tensors["z.second.f32"] = torch.randn(5)  # two tensors of one dtype, to pin the by-name tie break
    tensors["a.first.f32"] = torch.randn(3, 1)
    lib_save(tensors, tmp_path / "lib.safetensors", metadata=meta)
    st.save_file(tensors, tmp_path / "ours.safetensors", metadata=meta)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_multi_key_metadata_matches_the_library_as_json(tmp_path):
    # The library writes metadata keys in Rust HashMap order, random per process, so bytes cannot match; the
    # header's meaning and the data buffer still must.
    tensors, meta = {"w": torch.randn(4, 4)}, {"zz": "1", "aa": "2", "format": "pt"}
    lib_save(tensors, tmp_path / "lib.safetensors", metadata=meta)
    st.save_file(tensors, tmp_path / "ours.safetensors", metadata=meta)
    (lh, ls), (oh, os_) = st.read_header(tmp_path / "lib.safetensors"), st.read_header(tmp_path / "ours.safetensors")
    assert lh == oh and ls == os_
    assert (tmp_path / "ours.safetensors").read_bytes()[os_:] == (tmp_path / "lib.safetensors").read_bytes()[ls:]


def test_noncontiguous_and_shared_tensors_are_written_as_copies(tmp_path):
    w = torch.randn(4, 6)
    tensors = {"w": w, "w.t": w.t(), "w.row": w[1]}  # the library refuses all three together
    st.save_file(tensors, tmp_path / "x.safetensors")
    assert_same(st.load_file(tmp_path / "x.safetensors"), {k: v.contiguous() for k, v in tensors.items()})


def mapped_files():
    """{(start, end): path} of this process's file-backed memory mappings (Linux)."""
    out = {}
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out[(start, end)] = fields[5].strip()
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see mappings")
def test_tensors_are_views_into_a_private_map_of_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    st.save_file({"a": torch.arange(10_000.0), "b": torch.ones(3, dtype=torch.int64)}, path)
    before = path.read_bytes()
    loaded = st.load_file(path)
    maps = mapped_files()
    for t in loaded.values():  # read() into a buffer would put the tensors in anonymous memory instead
        (region,) = [p for (s, e), p in maps.items() if s <= t.data_ptr() < e]
        assert region == str(path)
    loaded["a"][0] = -1.0  # copy-on-write: the tensor changes, the file never does
    assert loaded["a"][0] == -1.0 and path.read_bytes() == before


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to measure resident memory")
def test_names_selects_tensors_without_reading_the_file(tmp_path):
    # A 256 MiB tensor in a sparse file: mapping it costs nothing, reading it would raise resident memory by 256 MiB.
    path = tmp_path / "big.safetensors"
    header = {"small": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "big": {"dtype": "U8", "shape": [256 << 20], "data_offsets": [8, 8 + (256 << 20)]}}
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + torch.tensor([1.5, 2.5]).numpy().tobytes())
        f.truncate(8 + len(raw) + 8 + (256 << 20))

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    start = rss()
    some = st.load_file(path, names=["small"])
    everything = st.load_file(path)
    assert rss() - start < 32 << 20
    assert list(some) == ["small"] and some["small"].tolist() == [1.5, 2.5]
    assert everything["big"].shape == (256 << 20,)
    with pytest.raises(KeyError, match="no tensors named \\['nope'\\]"):
        st.load_file(path, names=["nope"])


def test_tensors_outlive_the_loader(tmp_path):
    path = tmp_path / "x.safetensors"
    st.save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(True)}, path)
    loaded = st.load_file(path)
    a, b = loaded["a"], loaded["b"]
    del loaded
    gc.collect()  # only the tensors reference the map now; a closed map would crash or raise here
    assert a.sum().item() == 15.0 and b.item() is True


# --- corrupt files ------------------------------------------------------------------------------------------------


def rewrite(path, edit_header=None, n=None, data=None):
    """Rewrite the safetensors file at `path` with an edited header dict, a forged header size `n`, or other data."""
    header, data_start = st.read_header(path)
    raw_all = path.read_bytes()
    if edit_header:
        edit_header(header)
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes((len(raw) if n is None else n).to_bytes(8, "little") + raw
                     + (raw_all[data_start:] if data is None else data))


def set_entry(name, **fields):
    return lambda h: h[name].update(fields)


CORRUPTIONS = {
    "tiny file": (lambda p: p.write_bytes(b"\x01\x02\x03"), "shorter than the 8-byte header size"),
    "truncated header": (lambda p: p.write_bytes(p.read_bytes()[:30]), "runs past the end of the file"),
    "header size past end": (lambda p: rewrite(p, n=10_000), "header size 10000 runs past the end of the file"),
    "huge header size": (lambda p: rewrite(p, n=2**40), "larger than the 100000000-byte limit"),
    "header a byte over the limit": (lambda p: rewrite(p, n=st.MAX_HEADER_BYTES + 1),
                                     "header size 100000001 is larger than the 100000000-byte limit"),
    # (the file is 8 + N + 32 bytes: a header size of N + 33 runs one byte past its end, counting the 8-byte prefix)
    "header size a byte past end": (lambda p: (rewrite(p), rewrite(p, n=p.stat().st_size - 7)),
                                    "runs past the end of the file"),
    "garbage json": (lambda p: p.write_bytes((6).to_bytes(8, "little") + b"{nope}"), "not valid UTF-8 JSON"),
    "not utf-8": (lambda p: p.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{}"), "not valid UTF-8 JSON"),
    "json array": (lambda p: p.write_bytes((2).to_bytes(8, "little") + b"[]"), "expected an object"),
    "nested too deeply": (lambda p: p.write_bytes((200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000),
                          "the header's JSON is nested too deeply"),
    "duplicate name": (lambda p: p.write_bytes((40).to_bytes(8, "little") + (b'{"a":{},"a":{}}' + b" " * 25)),
                       "the header has duplicate keys ['a']"),  # (valid JSON: not said to be invalid)
    "bad metadata": (lambda p: rewrite(p, lambda h: h.update(__metadata__={"step": 3})), "must map strings to strings"),
    "missing field": (lambda p: rewrite(p, lambda h: h["a"].pop("shape")), "should be {dtype, shape, data_offsets}"),
    "extra field": (lambda p: rewrite(p, set_entry("a", crc=0)), "should be {dtype, shape, data_offsets}"),
    "unknown dtype": (lambda p: rewrite(p, set_entry("a", dtype="F7")),
                      "tensor 'a' has unknown dtype 'F7'; known dtypes: BOOL, U8"),
    "negative shape": (lambda p: rewrite(p, set_entry("a", shape=[-2, -2])), "list of non-negative integers"),
    "float shape": (lambda p: rewrite(p, set_entry("a", shape=[2.0, 2])), "list of non-negative integers"),
    "true in shape": (lambda p: rewrite(p, set_entry("a", shape=[True, 4])), "list of non-negative integers"),
    "negative offsets": (lambda p: rewrite(p, set_entry("a", data_offsets=[-16, 0])),
                         "data_offsets [-16, 0], expected [begin, end], non-negative integers"),
    "false as an offset": (lambda p: rewrite(p, set_entry("a", data_offsets=[False, 16])),
                           "data_offsets [False, 16], expected [begin, end], non-negative integers"),
    "end before begin": (lambda p: rewrite(p, set_entry("a", data_offsets=[16, 0])), "end is before begin"),
    "wrong offsets size": (lambda p: rewrite(p, set_entry("a", data_offsets=[0, 12])),
                           "data_offsets [0, 12] (12 bytes), but shape [2, 2] of F32 needs 16 bytes"),
    "offsets too long": (lambda p: rewrite(p, set_entry("a", data_offsets=[0, 20])), "(20 bytes), but shape [2, 2]"),
    "tensor past end": (lambda p: p.write_bytes(p.read_bytes()[:-4]),
                        "tensor 'b' has data_offsets [16, 32], past the end of the 28-byte data buffer"),
    "tensor a byte past end": (lambda p: p.write_bytes(p.read_bytes()[:-1]),
                               "tensor 'b' has data_offsets [16, 32], past the end of the 31-byte data buffer"),
    "overlap": (lambda p: rewrite(p, set_entry("b", data_offsets=[8, 24])), "'a' (ends at 16) and 'b'"),
    "overlap by a byte": (lambda p: rewrite(p, set_entry("b", data_offsets=[15, 31])),
                          "'a' (ends at 16) and 'b' (data_offsets [15, 31]) overlap"),
    # What the library refuses too: bytes no tensor owns could carry another file inside this one
    "hole": (lambda p: rewrite(p, set_entry("a", shape=[2], data_offsets=[8, 16])),
             "bytes 0 to 8 of the data buffer belong to no tensor (a hole before 'a')"),
    "trailing bytes": (lambda p: p.write_bytes(p.read_bytes() + b"PK\x03\x04 a zip"),
                       "the tensors end at byte 32 of the 42-byte data buffer: the rest belongs to none"),
    "dtype not a string": (lambda p: rewrite(p, set_entry("a", dtype=["F32"])), "tensor 'a' has unknown dtype ['F32']"),
    "shape past any address": (lambda p: rewrite(p, set_entry("a", shape=[0, 2 ** 64])),
                               "has shape [0, 18446744073709551616], more bytes than a tensor can address"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_files_are_refused_with_a_reason(tmp_path, corruption):
    corrupt, message = CORRUPTIONS[corruption]
    path = tmp_path / "x.safetensors"
    lib_save({"a": torch.ones(2, 2), "b": torch.zeros(4)}, path)  # a: [0, 16], b: [16, 32]
    corrupt(path)
    for read in (st.read_header, st.load_file, st.metadata):
        with pytest.raises(ValueError) as e:
            read(path)
        assert message in str(e.value) and str(path) in str(e.value)


def test_a_header_may_list_its_tensors_in_any_order_and_load_puts_them_on_the_device(tmp_path):
    path = tmp_path / "x.safetensors"
    lib_save({"a": torch.ones(2, 2), "b": torch.arange(4.0)}, path)  # a: [0, 16], b: [16, 32]
    rewrite(path, lambda h: h.update({k: h.pop(k) for k in ("a", "__metadata__") if k in h}))  # b listed first
    assert list(st.read_header(path)[0])[0] == "b"
    assert_same(st.load_file(path), {"a": torch.ones(2, 2), "b": torch.arange(4.0)})
    assert {t.device.type for t in st.load_file(path, device="meta").values()} == {"meta"}


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such safetensors file"):
        st.load_file(tmp_path / "nope.safetensors")


def test_save_refuses_bad_metadata_and_names(tmp_path):
    with pytest.raises(ValueError, match="must map str to str.*'step': 3"):
        st.save_file({"a": torch.ones(1)}, tmp_path / "x.safetensors", metadata={"step": 3})
    with pytest.raises(ValueError, match="expected {str: torch.Tensor}"):
        st.save_file({"a": [1.0]}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="must map str to str.*3: 'x'"):
        st.save_file({"a": torch.ones(1)}, tmp_path / "x.safetensors", metadata={3: "x"})
    with pytest.raises(ValueError, match="'__metadata__' is reserved by the format"):
        st.save_file({"__metadata__": torch.ones(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="tensor 'z' has dtype torch.complex64; supported: "):
        st.save_file({"z": torch.ones(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


# --- atomic save --------------------------------------------------------------------------------------------------


# fail_in: mid-way through the data / after it, before the rename / Ctrl-C
@pytest.mark.parametrize("fail_in", ["numpy", "fsync", "ctrl-c"])
def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "x.safetensors"
    st.save_file({"old": torch.ones(3)}, path)
    before = path.read_bytes()

    real_numpy, calls = torch.Tensor.numpy, []

    def fail_on_second_tensor(self, *args, **kwargs):  # the header and first tensor are written by then
        calls.append(self)
        if len(calls) > 1:
            raise OSError("disk full")
        return real_numpy(self, *args, **kwargs)

    def fail(*args):
        raise KeyboardInterrupt if fail_in == "ctrl-c" else OSError("disk full")

    if fail_in == "numpy":
        monkeypatch.setattr(torch.Tensor, "numpy", fail_on_second_tensor)
    else:
        monkeypatch.setattr(os, "fsync", fail)
    elsewhere = tmp_path / "cwd"  # the temporary goes beside the file, not into the working folder
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(KeyboardInterrupt if fail_in == "ctrl-c" else OSError):
        st.save_file({"new.a": torch.zeros(1000), "new.b": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cwd", "x.safetensors"] and os.listdir(elsewhere) == []
    monkeypatch.undo()
    # A save that succeeds leaves only its file, renamed from beside it (a rename across file systems, as from the
    # working folder, is not atomic or fails)
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(os.path.dirname(os.path.abspath(src))) or
                        replace(src, dst))
    monkeypatch.chdir(elsewhere)
    st.save_file({"new": torch.zeros(3)}, path)
    assert sorted(os.listdir(tmp_path)) == ["cwd", "x.safetensors"] and renamed == [str(tmp_path)]


# --- sharded checkpoints ------------------------------------------------------------------------------------------


def model_tensors():
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(16, 8, generator=g),  # 512 bytes
            "layers.0.w": torch.randn(8, 8, generator=g).bfloat16(),  # 128
            "huge": torch.randn(300, generator=g),  # 1200: over the limit, a shard of its own, the first
            "layers.1.w": torch.randn(8, 8, generator=g).bfloat16(),
            "norm.weight": torch.randn(8, generator=g),
            "lm_head.weight": torch.randn(16, 8, generator=g)}


def test_sharded_save_matches_huggingface_hub_byte_for_byte(tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    tensors = model_tensors()
    st.save_sharded(tensors, tmp_path / "ours", max_shard_bytes=700)
    (tmp_path / "hub").mkdir()
    hub.save_torch_state_dict(tensors, tmp_path / "hub", max_shard_size=700)
    ours = sorted(os.listdir(tmp_path / "ours"))
    assert ours == sorted(os.listdir(tmp_path / "hub")) and len(ours) == 4  # 3 shards + index
    for file in ours:
        assert (tmp_path / "ours" / file).read_bytes() == (tmp_path / "hub" / file).read_bytes(), file
    index = json.loads((tmp_path / "ours" / st.INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}
    assert index["weight_map"]["huge"] == "model-00001-of-00003.safetensors"
    assert set(index["weight_map"]) == set(tensors)
    assert_same(st.load_sharded(tmp_path / "ours"), tensors)
    assert_same(st.load_sharded(tmp_path / "hub"), tensors)
    # A shard that the tensors fill exactly (512 + 128 bytes) stays one shard, and a tensor exactly the limit's size
    # (1200 bytes) is not set apart as an oversized one, as in the hub's split.
    for limit in (640, 1200):
        st.save_sharded(tensors, tmp_path / f"exact{limit}", max_shard_bytes=limit)
        (tmp_path / f"hub-exact{limit}").mkdir()
        hub.save_torch_state_dict(tensors, tmp_path / f"hub-exact{limit}", max_shard_size=limit)
        files = sorted(os.listdir(tmp_path / f"exact{limit}"))
        assert files == sorted(os.listdir(tmp_path / f"hub-exact{limit}"))
        for file in files:
            assert (tmp_path / f"exact{limit}" / file).read_bytes() == \
                (tmp_path / f"hub-exact{limit}" / file).read_bytes(), (limit, file)
    index = json.loads((tmp_path / "exact640" / st.INDEX_NAME).read_text())["weight_map"]
    assert index["embed.weight"] == index["layers.0.w"]
    # Nothing to save still makes a folder that loads (as nothing)
    st.save_sharded({}, tmp_path / "empty", max_shard_bytes=640)
    assert st.load_sharded(tmp_path / "empty") == {}


def test_huggingface_hub_loads_our_shards_into_a_model(tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    st.save_sharded(model.state_dict(), tmp_path, max_shard_bytes=300)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    hub.load_torch_model(fresh, tmp_path, strict=True)
    assert_same(fresh.state_dict(), model.state_dict())


def test_single_shard_folder_replaces_an_old_sharded_save(tmp_path):
    tensors = model_tensors()
    st.save_sharded(tensors, tmp_path, max_shard_bytes=700)
    st.save_sharded(tensors, tmp_path, max_shard_bytes=10_000)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # (a stale index would confuse readers)
    assert_same(st.load_sharded(tmp_path), tensors)


def test_a_folder_with_both_layouts_loads_model_safetensors_as_transformers_does(tmp_path):
    # transformers' from_pretrained looks for model.safetensors before the index, so a folder holding both (a copied
    # folder, a repository with an extra file) gives its model.safetensors: the same folder, the same weights.
    tensors = model_tensors()
    st.save_sharded(tensors, tmp_path, max_shard_bytes=700)  # shards and an index
    single = {k: v + 1 for k, v in tensors.items()}
    st.save_file(single, tmp_path / "model.safetensors")
    assert_same(st.load_sharded(tmp_path), single)


def test_sharded_load_checks_the_index_against_the_shards(tmp_path):
    st.save_sharded(model_tensors(), tmp_path, max_shard_bytes=700)
    index_path = tmp_path / st.INDEX_NAME
    index = json.loads(index_path.read_text())

    def with_map(weight_map):
        index_path.write_text(json.dumps({**index, "weight_map": weight_map}))

    with_map({**index["weight_map"], "huge": "model-00009-of-00009.safetensors"})
    with pytest.raises(ValueError, match="lists shard 'model-00009-of-00009.safetensors', which is not in"):
        st.load_sharded(tmp_path)
    with_map({**index["weight_map"], "ghost": "model-00002-of-00003.safetensors"})
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors does not match .*missing \\['ghost'\\]"):
        st.load_sharded(tmp_path)
    with_map({k: v for k, v in index["weight_map"].items() if k != "norm.weight"})
    with pytest.raises(ValueError, match="missing \\[\\], extra \\['norm.weight'\\]"):
        st.load_sharded(tmp_path)
    for outside in ("../elsewhere.safetensors", str(tmp_path.parent / "elsewhere.safetensors")):  # only its own files
        with_map({**index["weight_map"], "norm.weight": outside})
        with pytest.raises(ValueError, match=f"lists shard '{re.escape(outside)}': expected a file name in"):
            st.load_sharded(tmp_path)
    # A tensor listed twice, in another shard and then its own: json.load alone kept the last entry, and the folder
    # loaded without a word (in the other order, the shard was blamed for a tensor it lacks).
    entries = [f'"{k}": "{v}"' for k, v in index["weight_map"].items()]
    index_path.write_text('{"weight_map": {"norm.weight": "model-00009-of-00009.safetensors", ' + ", ".join(entries) +
                          "}}")
    with pytest.raises(ValueError, match=re.escape(f"{index_path} has duplicate keys ['norm.weight']: each key once")):
        st.load_sharded(tmp_path)
    index_path.write_text('{"weight_map": ["not", "a", "map"]}')
    with pytest.raises(ValueError, match='index.json: expected JSON {"weight_map": {name: shard file}}'):
        st.load_sharded(tmp_path)
    index_path.write_text('{"weight_map": {"norm.weight": 3}}')  # (os.path.join failed on it, deep in the loader)
    with pytest.raises(ValueError, match="expected JSON .*the shard of 'norm.weight' is 3, not a file name"):
        st.load_sharded(tmp_path)
    index_path.write_text('{"weight_map": {"norm.weight": ""}}')  # (the folder itself)
    with pytest.raises(ValueError, match="expected JSON .*the shard of 'norm.weight' is '', not a file name"):
        st.load_sharded(tmp_path)
    (tmp_path / "sub").mkdir()
    index_path.write_text('{"weight_map": {"norm.weight": "sub"}}')  # a folder, not a shard file
    with pytest.raises(ValueError, match="lists shard 'sub', which is not in"):
        st.load_sharded(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors.index.json nor model.safetensors"):
        st.load_sharded(tmp_path / "empty")


def test_a_save_removes_only_its_own_earlier_files(tmp_path):
    # A new save clears the old layout's shards and index, but a file that only begins like one (a backup of one's
    # own) is not one of them.
    mine = ["model.safetensors.bak", "model-00001-of-00002.safetensors.orig"]
    for name in mine:
        (tmp_path / name).write_bytes(b"mine")
    st.save_sharded({"a": torch.ones(4)}, tmp_path, 1 << 20)
    assert all((tmp_path / name).read_bytes() == b"mine" for name in mine)


def test_finite_weights_whose_sum_overflows_are_not_refused():
    from nanovl.checkpoint import check_finite
    check_finite({"big": torch.full((4,), 3e38), "wide": torch.full((2,), 1e300, dtype=torch.float64)}, "x")
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_finite({"big": torch.tensor([3e38, float("nan")])}, "x")
