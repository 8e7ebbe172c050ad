"""The one reader: lazy access, and hostile headers with valid checksums refused by every
read entry point before any allocation or kernel (the reproductions of the hardening issue)."""

from __future__ import annotations

import os
import struct
import sys
import zlib

import msgpack
import pytest
import torch

import swsformat
from swsformat.cli import main
from swsformat.spec import MAX_TENSORS

from .conftest import DATA, ROOT, TiedToCodebook, quantized

sys.path.insert(0, str(ROOT / "scripts"))
import fuzz  # noqa: E402


def edited(edit, version: int = 2, relayout: bool = True, sd=None) -> bytes:
    """A valid file whose decoded header ``edit`` changes; sections re-laid, CRCs recomputed."""
    sd = sd or {"a.weight": torch.zeros(4, 8), "b.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "c": torch.ones(3)}
    v, header, payload = fuzz._split(swsformat.encode_bytes(sd, version=version, smallest=False, index_bits=None))
    edit(header)
    payload = fuzz.relayout(header, payload, v) if relayout else payload
    return fuzz._pack(header, v, None) + payload


def every_reader(data: bytes, tmp_path, header_only: bool = True) -> list[str]:
    """Feed ``data`` to every public read entry point (those that decode, and with
    ``header_only`` those that read the header alone); return the messages of their
    SwsErrors (anything else propagates and fails the test)."""
    path = tmp_path / "in.sws"
    path.write_bytes(data)
    calls = [
        lambda: swsformat.load(data), lambda: swsformat.load(data, sparse=True), lambda: swsformat.size_report(data),
        lambda: swsformat.load_state_dict(path), lambda: swsformat.load_state_dict(path, sparse=True),
        lambda: swsformat.load_model(path), lambda: swsformat.size_report(path), lambda: swsformat.open(path).state_dict(),
    ]
    if header_only:
        calls += [lambda: swsformat.inspect(path), lambda: swsformat.read_header(path)]
    messages = []
    for call in calls:
        with pytest.raises(swsformat.SwsError) as info:
            call()
        messages.append(str(info.value))
    return messages


def test_lazy_reader_reads_one_tensor_and_knows_the_header(tmp_path):
    sd = {"a.weight": quantized((50, 60), 0.1, 8), "a.bias": torch.randn(50), "n": torch.tensor(3)}
    path = tmp_path / "m.sws"
    swsformat.encode(sd, path, metadata={"who": "me"}, architecture={"name": "x", "kwargs": {"k": 1}})
    with swsformat.open(path) as f:
        assert f.keys() == list(sd) and len(f) == 3 and "a.bias" in f and list(f) == list(sd)
        assert f.metadata() == {"who": "me"} and f.architecture == {"name": "x", "kwargs": {"k": 1}}
        assert f.entry("a.weight").nonzeros == int(sd["a.weight"].count_nonzero())
        assert torch.equal(f.get_tensor("a.bias"), sd["a.bias"])
        dense = f.get_tensor("a.weight")
        csr = f.get_tensor("a.weight", sparse=True)
        assert torch.equal(dense, sd["a.weight"]) and torch.equal(csr.to_dense(), sd["a.weight"])
        with pytest.raises(KeyError, match="no tensor 'nope'"):
            f.get_tensor("nope")
    assert f._fd is None  # closed by the context manager
    with swsformat.open(path.read_bytes()) as f:
        assert torch.equal(f.state_dict()["n"], sd["n"])


def test_open_reads_only_prelude_and_header(tmp_path, monkeypatch):
    """A tensor's bytes are read when it is asked for, not before."""
    path = tmp_path / "m.sws"
    swsformat.encode({"a.weight": quantized((300, 400), 0.1, 8)}, path)
    reads = []
    original = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or original(fd, n, off))
    f = swsformat.open(path)
    assert reads == []
    f.get_tensor("a.weight")
    assert sum(reads) == f.entry("a.weight").end - f.entry("a.weight").start
    f.close()


def test_output_limit_counts_what_the_reader_decodes(tmp_path):
    path = tmp_path / "m.sws"
    swsformat.encode({"a.weight": torch.zeros(3000, 3000)}, path)  # 36 MB of zeros in a tiny file
    with swsformat.open(path, max_output_bytes=10_000_000) as f:
        with pytest.raises(swsformat.SwsFormatError, match="max_output_bytes"):
            f.get_tensor("a.weight")
    assert swsformat.load_state_dict(path)["a.weight"].shape == (3000, 3000)  # under the default 64 MiB


# ----------------------------------------------------------------- the reproductions


@pytest.mark.parametrize("code", [bytes([0x11] * 16), bytes([0x22] * 16), bytes([0x12, 0x34] * 8),
                                  bytes([0x10] + [0] * 15), bytes([0xFF] * 16)])
@pytest.mark.parametrize("version", [1, 2])
def test_empty_coded_tensor_with_any_code_table(code, version, tmp_path):
    """entries = 0 with an over-subscribed or over-long code table: refused at the header
    (the decode table builder used to write past its array)."""

    def edit(h):
        h["tensors"][0]["gaps"]["code"] = code

    data = edited(edit, version)
    if code in (bytes([0x10] + [0] * 15), bytes([0xFF] * 16)):  # valid (incomplete, unused) codes
        assert swsformat.load(data)["a.weight"].count_nonzero() == 0
        assert swsformat.size_report(data)["tensors"][0]["gap_entropy_bits"] == 0
        return
    for msg in every_reader(data, tmp_path):
        assert "tensor 'a.weight', field 'gaps'" in msg and "Kraft" in msg


@pytest.mark.parametrize("rows", [2**22, 2**29, 2**40, 2**62])
def test_many_rows_over_zero_columns_count_against_the_limit(rows, tmp_path):
    data = edited(lambda h: h["tensors"][0].update(shape=[rows, 0]))
    if rows == 2**22:  # 32 MiB of row pointers: within the default limit, decoded at once
        assert swsformat.load(data, sparse=True)["a.weight"].shape == (rows, 0)
        assert swsformat.load(data)["a.weight"].shape == (rows, 0)
    else:
        for msg in every_reader(data, tmp_path, header_only=False):
            # load_model checks the architecture first; 2**62 rows overflow 8-byte strides
            assert any(m in msg for m in ("max_output_bytes", "names no architecture", "overflow int64 byte strides")), msg


def test_plot_obeys_the_output_limit(tmp_path):
    pytest.importorskip("matplotlib")
    from swsformat.plotting import plot_file

    path = tmp_path / "big.sws"
    path.write_bytes(edited(lambda h: h["tensors"][1].update(shape=[2, 2**40])))
    with pytest.raises(swsformat.SwsFormatError):
        plot_file(path, str(tmp_path / "p"))
    assert main(["plot", str(path), "-o", str(tmp_path / "p")]) == 1


def _raw_deflated(header: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    stored = c.compress(header) + c.flush()
    head = swsformat.spec.MAGIC + struct.pack("<HBBII", 2, 1, 0, len(stored), len(header)) + stored
    head += struct.pack("<I", zlib.crc32(head))
    return head + bytes(-len(head) % 8)


def test_header_bombs_are_refused_before_unpacking(tmp_path):
    empty_maps = b"\xdd" + struct.pack(">I", 16_000_000) + b"\x80" * 16_000_000
    with pytest.raises(swsformat.SwsFormatError, match="more than 8 times"):
        swsformat.load(_raw_deflated(empty_maps))
    with pytest.raises(swsformat.SwsFormatError, match="an array or map with too many items"):
        swsformat.load(swsformat.container.pack_head(empty_maps, 2, 0))
    block = b"\xdc" + struct.pack(">H", 65_535) + b"\x80" * 65_535
    assert len(swsformat.container.unpack_header(b"\x9a" + block * 10)) == 10  # 655,361 containers: allowed
    with pytest.raises(swsformat.SwsFormatError, match="too many maps and arrays"):
        swsformat.load(swsformat.container.pack_head(b"\x9f" + block * 15, 2, 0))  # 983,041
    deep = b"\x91" * 100_000 + b"\x90"
    with pytest.raises(swsformat.SwsFormatError, match="nests containers too deeply"):
        swsformat.load(swsformat.container.pack_head(deep, 2, 0))


def test_tensor_count_is_bounded(tmp_path):
    empty = {"name": "", "kind": "raw", "dtype": "float32", "shape": [0], "data": [0, 0, 0]}
    header = {"format": "sws", "version": 2, "library": "", "architecture": None, "metadata": {},
              "tensors": [dict(empty, name=f"t{i}") for i in range(MAX_TENSORS + 1)]}
    raw = msgpack.packb(header, use_bin_type=True)
    for data in (_raw_deflated(raw), swsformat.container.pack_head(raw, 2, 0)):
        with pytest.raises(swsformat.SwsFormatError, match="more than 8 times|too many items"):
            swsformat.load(data)
    with pytest.raises(swsformat.SwsEncodeError, match="would not be readable.*(too many items|exceeds the limit)"):
        swsformat.encode_bytes({f"t{i}": torch.zeros(0) for i in range(MAX_TENSORS + 1)})


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["tensors"][0].pop("nonzeros"), "missing keys \\['nonzeros'\\]"),
        (lambda h: h["tensors"][0].update(shape="x"), "shape"),
        (lambda h: h["tensors"].append(5), "expected a map"),
        (lambda h: h.update(metadata=[]), "metadata"),
        (lambda h: h.update(architecture={"name": "x"}), "architecture"),
        (lambda h: h["tensors"][0]["gaps"].update(code=5), "expected bytes"),
    ],
)
def test_header_only_readers_validate_the_schema(edit, match, tmp_path):
    path = tmp_path / "m.sws"
    path.write_bytes(edited(edit))
    for reader in (swsformat.inspect, swsformat.read_header, swsformat.open):
        with pytest.raises(swsformat.SwsFormatError, match=match):
            reader(path)


@pytest.mark.parametrize(
    "arch, match",
    [
        ({"name": "lenet300-100", "kwargs": {"num_classes": "x"}}, "cannot build the file's architecture 'lenet300-100'"),
        ({"name": "lenet300-100", "kwargs": {"bogus": 1}}, "unexpected keyword"),
        ({"name": "lenet300-100", "kwargs": {"num_classes": -5}}, "cannot build"),
        ({"name": "nope", "kwargs": {}}, "not registered"),
        ({"name": "lenet5-caffe", "kwargs": {}}, "do not fit its architecture"),
    ],
)
def test_hostile_architecture_is_a_format_error(arch, match, tmp_path):
    path = tmp_path / "m.sws"
    path.write_bytes(edited(lambda h: h.update(architecture=arch)))
    with pytest.raises(swsformat.SwsFormatError, match=match):
        swsformat.load_model(path)
    assert main(["eval", str(path)]) in (1, 2)


def test_readers_check_the_magic_before_reading_more(tmp_path):
    for source in ("/dev/zero", "/dev/urandom"):
        if os.path.exists(source):
            with pytest.raises(swsformat.SwsFormatError, match="bad magic"):
                swsformat.load_state_dict(source)
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:  # a sparse 3 GB file that is no .sws file
        f.truncate(3 << 30)
    for reader in (swsformat.load_state_dict, swsformat.inspect, swsformat.size_report, swsformat.load_model):
        with pytest.raises(swsformat.SwsFormatError, match="bad magic"):
            reader(big)


def test_size_is_checked_against_the_header_before_the_payload(tmp_path):
    data = swsformat.encode_bytes({"a.weight": quantized((20, 30), 0.2, 4)})
    path = tmp_path / "m.sws"
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(swsformat.SwsFormatError, match="trailing bytes"):
        swsformat.open(path)
    path.write_bytes(data[:-1])
    with pytest.raises(swsformat.SwsFormatError, match="truncated"):
        swsformat.open(path)


@pytest.mark.parametrize(
    "sd, kwargs, match",
    [
        ({"x" * 1025: torch.zeros(1)}, {}, "name"),
        ({"x": torch.zeros([1] * 17)}, {}, "at most 16"),
        ({"x": torch.zeros(1)}, {"architecture": "a" * 1025}, "name"),
        ({"x": torch.zeros(1)}, {"architecture": {"name": "a", "kwargs": {1: 2}}}, "map key"),
        ({"x": torch.zeros(1)}, {"architecture": {"name": "a", "kwargs": {"a": object()}}}, "cannot be written"),
        ({"x": torch.zeros(1)}, {"architecture": {"name": "a", "kwargs": {"a": fuzz._nested(20)}}}, "too deeply"),
    ],
)
def test_writer_refuses_what_the_reader_would_refuse(sd, kwargs, match, tmp_path):
    path = tmp_path / "m.sws"
    with pytest.raises(swsformat.SwsEncodeError, match=match):
        swsformat.encode(sd, path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_golden_files_still_read_through_every_entry_point(tmp_path):
    for version in (1, 2):
        path = DATA / f"golden-v{version}.sws"
        with swsformat.open(path) as f:
            assert f.version == version
            sd = f.state_dict()
        assert sd.keys() == swsformat.load_state_dict(path).keys()
        assert [t["name"] for t in swsformat.inspect(path)] == list(sd)


def test_streams_are_read_lazily_and_within_the_limit(tmp_path):
    """A pipe: the header alone for header readers; a declared data area over the limit is
    refused before it is read; a FIFO with no writer does not block."""
    import subprocess

    edit = lambda h: h["tensors"].append(  # noqa: E731
        {"name": "big", "kind": "raw", "dtype": "uint8", "shape": [2**40], "data": b""})
    head = edited(edit)
    v, header, _ = fuzz._split(head)
    header["tensors"][-1]["data"] = [header["tensors"][-1]["data"][0], 2**40, 0]
    endless = fuzz._pack(header, v, None)
    script = ("import sys, swsformat\n"
              "print(sorted(swsformat.read_header('/dev/stdin')['metadata']))\n")
    r = subprocess.run(f"cat {tmp_path / 'h.sws'} /dev/zero | {sys.executable} -c \"{script}\"", shell=True,
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       preexec_fn=lambda: (tmp_path / "h.sws").write_bytes(endless))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-500:]
    script = ("import sys, swsformat\n"
              "try:\n    swsformat.load_state_dict('/dev/stdin')\n"
              "except swsformat.SwsFormatError as e:\n    print('refused:', e)\n")
    r = subprocess.run(f"cat {tmp_path / 'h.sws'} /dev/zero | {sys.executable} -c \"{script}\"", shell=True,
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "refused:" in r.stdout and "over the limit" in r.stdout, r.stdout + r.stderr[-500:]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(swsformat.SwsFormatError, match="bad magic"):
        swsformat.inspect(fifo)


def test_bool_bytes_and_padding_bits_must_be_zero_beyond_their_use(tmp_path):
    def bad_bool(h):
        h["tensors"].append({"name": "f", "kind": "raw", "dtype": "bool", "shape": [2], "data": b"\x02\xff"})

    for data in (edited(bad_bool),):
        with pytest.raises(swsformat.SwsFormatError, match="bool byte"):
            swsformat.load(data)
    # The writer stores 0/1 for a bool tensor viewed from other bytes.
    odd = torch.tensor([2, 255, 0], dtype=torch.uint8).view(torch.bool)
    assert swsformat.load(swsformat.encode_bytes({"f": odd}))["f"].view(torch.uint8).tolist() == [1, 1, 0]
    sd = {"a.weight": quantized((5, 7), 0.4, 3)}
    v, header, payload = fuzz._split(swsformat.encode_bytes(sd, smallest=False, version=2))
    t = header["tensors"][0]
    for fld in ("row_counts", "gaps", "values"):
        sec = t[fld] if fld == "row_counts" else t[fld]["section"]
        bits = 5 * t["row_bits"] if fld == "row_counts" else t[fld]["bits"]
        if bits % 8 == 0:
            continue
        p = bytearray(payload)
        p[sec[0] + sec[1] - 1] |= 1  # the last bit of the section: padding
        relaid = fuzz.relayout(header, bytes(p), v)
        with pytest.raises(swsformat.SwsFormatError, match=f"field '{fld}': padding bits"):
            swsformat.load(fuzz._pack(header, v, None) + relaid)
        header = fuzz._split(swsformat.encode_bytes(sd, smallest=False, version=2))[1]
        t = header["tensors"][0]


def test_model_loading_edge_cases(tmp_path):
    import warnings

    from swsformat.retrain.models import build_model

    path = tmp_path / "m.sws"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes that zero-element tensors are not initialised
        model = build_model("lenet300-100", num_classes=0)  # a zero-row last layer
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.where(p > 0, 0.25, 0.0))
    swsformat.encode(model, path)
    model = swsformat.load_model(path, sparse=True)
    assert model.sws_layouts["fc3"] == "dense: empty weight" and model(torch.randn(2, 1, 28, 28)).shape == (2, 0)
    with pytest.raises(swsformat.SwsFormatError, match=r"do not fit the module \(Linear\)"):
        swsformat.load_model(path, torch.nn.Linear(3, 3))
    neg = torch._neg_view(torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    assert torch.equal(swsformat.load(swsformat.encode_bytes({"n.weight": neg}))["n.weight"], -torch.tensor([[0.5, 0.0], [0.0, 0.5]]))


def test_read_paths_import_no_training_code():
    import subprocess

    script = ("import sys, swsformat\n"
              f"m = swsformat.load_model({str(ROOT / 'results' / 'paper' / 'lenet5-caffe.sws')!r})\n"
              "swsformat.size_report(" + repr(str(ROOT / "results" / "paper" / "lenet5-caffe.sws")) + ")\n"
              "print(sorted(k for k in sys.modules if k.startswith('swsformat.retrain')))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_register_architecture_lets_a_file_name_your_model(tmp_path):
    from swsformat.architectures import ARCHITECTURES

    @swsformat.register_architecture("test-tiny-net")
    class Tiny(torch.nn.Module):
        def __init__(self, width: int = 4) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, width)

    try:
        net = Tiny(width=5)
        with torch.no_grad():
            net.fc.weight.copy_(torch.where(net.fc.weight > 0, 0.5, 0.0))
        path = tmp_path / "tiny.sws"
        swsformat.encode(net, path, architecture={"name": "test-tiny-net", "kwargs": {"width": 5}})
        loaded = swsformat.load_model(path)
        assert isinstance(loaded, Tiny) and torch.equal(loaded.fc.weight, net.fc.weight)
        with pytest.raises(ValueError, match="already registered"):
            swsformat.register_architecture("test-tiny-net")(torch.nn.Linear)
    finally:
        ARCHITECTURES.pop("test-tiny-net", None)


@pytest.mark.parametrize(
    "record",
    ['{"normalization":"standard","mean":' + "9" * 400 + ',"std":1}', '{"normalization":"standard","mean":0,"std":1e-320}',
     '{"normalization":"unit","shape":[]}', '{"normalization":"unit","shape":' + str([1] * 70) + "}",
     '{"normalization":"unit","shape":[100000,100000]}', "[1]", "not json"],
)
def test_hostile_input_records_are_format_errors_and_never_block_loading(record, tmp_path):
    path = tmp_path / "m.sws"
    swsformat.encode({"w.weight": torch.zeros(2, 2)}, path, metadata={"sws.input": record})
    assert main(["info", str(path)]) == 0
    with pytest.raises(swsformat.SwsFormatError, match="not an input record"):
        swsformat.open(path).input_spec()
    with pytest.warns(UserWarning, match="sws.input metadata ignored"):
        model = swsformat.load_model(path, _one_weight())
    assert model.sws_input is None
    with pytest.raises(swsformat.SwsFormatError):
        swsformat.load_model(path, _one_weight(), normalize_inputs=True)


def _one_weight() -> torch.nn.Module:
    m = torch.nn.Module()
    m.w = torch.nn.Linear(2, 2, bias=False)
    return m


def test_normalize_inputs_applies_once_however_often_a_module_is_loaded(tmp_path):
    path = tmp_path / "m.sws"
    record = '{"data":"mnist","normalization":"standard","shape":[2],"scale":0.5,"mean":0.5,"std":0.25}'
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
    swsformat.encode({"weight": layer.weight.detach()}, path, metadata={"sws.input": record})
    target = torch.nn.Linear(2, 2, bias=False)
    for _ in range(3):
        model = swsformat.load_model(path, target, normalize_inputs=True)
    assert torch.equal(model(torch.tensor([1.0, 0.5])), torch.tensor([2.0, 0.0]))
    assert model.sws_input["applied_by_model"] is True
    model = swsformat.load_model(path, target)
    assert torch.equal(model(torch.tensor([1.0, 0.5])), torch.tensor([1.0, 0.5]))


def test_a_module_tie_the_file_holds_apart_loads_the_same_way_every_time(tmp_path):
    """Two different tensors in the file for one tied parameter: decoded apart and copied in
    file order (the last stays), with a warning, never both into one storage at once."""
    sd = {k: v.detach().clone() for k, v in TiedToCodebook().state_dict().items()}
    sd["codebook"], sd["lin.weight"] = torch.zeros(32, 16), torch.ones(32, 16)
    swsformat.encode(sd, tmp_path / "t.sws", compress=set())
    for _ in range(3):
        with pytest.warns(UserWarning, match="holds as separate tensors"):
            m = swsformat.load_model(tmp_path / "t.sws", TiedToCodebook())
        assert m.codebook is m.lin.weight and bool((m.codebook == 1).all())


def test_a_tied_tensor_the_file_leaves_out_comes_from_the_tie(tmp_path):
    """A Hugging Face save_pretrained folder drops lm_head.weight (tied to the embedding): the
    file then holds one of the two names, and load_model fills the other from the module's own
    tie, strictly; a missing name that is not tied still fails."""
    sd = {k: v.detach().clone() for k, v in TiedToCodebook().state_dict().items()}
    del sd["lin.weight"]
    swsformat.encode(sd, tmp_path / "t.sws", compress=set())
    m = swsformat.load_model(tmp_path / "t.sws", TiedToCodebook())
    assert m.codebook is m.lin.weight and torch.equal(m.codebook, sd["codebook"])
    del sd["lin.bias"]
    swsformat.encode(sd, tmp_path / "u.sws", compress=set())
    with pytest.raises(swsformat.SwsFormatError, match="lin.bias"):
        swsformat.load_model(tmp_path / "u.sws", TiedToCodebook())


def test_load_model_misuse_is_one_clear_error(tmp_path):
    """Not torch's errors from deep inside the load: a string for the module, a module built on
    the meta device or with lazy layers, a CUDA device without CUDA, names that differ."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    path = tmp_path / "n.sws"
    swsformat.encode(net, path, compress=[])
    with pytest.raises(swsformat.SwsConfigError, match="module must be your built torch.nn.Module, got str"):
        swsformat.load_model(path, "lenet5")
    with torch.device("meta"):
        meta = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(swsformat.SwsConfigError, match="'0.weight' is on the meta device"):
        swsformat.load_model(path, meta)
    with pytest.raises(swsformat.SwsConfigError, match="'0.weight' is not initialised yet"):
        swsformat.load_model(path, torch.nn.Sequential(torch.nn.LazyLinear(4)))
    with pytest.raises(swsformat.SwsConfigError, match="'bogus' is not a torch device"):
        swsformat.load_model(path, net, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(swsformat.SwsConfigError, match="no CUDA device"):
            swsformat.load_model(path, net, device="cuda")
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4),
                                torch.nn.Linear(4, 4))
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(swsformat.SwsFormatError) as e:
        swsformat.load_model(path, other)
    msg = str(e.value)
    assert "6 of the module's tensors are not in the file ('1.bias', '1.weight', '3.bias' and 3 more)" in msg
    assert "2 of the file's are not in the module ('2.bias', '2.weight'); the names differ" in msg and len(msg) < 600
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # nothing written
