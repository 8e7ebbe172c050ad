"""Malformed, truncated and corrupted files raise SwsFormatError, never anything else."""

from __future__ import annotations

import random
import struct
import zlib

import msgpack
import numpy as np
import pytest
import torch

import swsformat
from swsformat.container import decode_header, pack_head, parse, read_prelude
from swsformat.errors import SwsChecksumError, SwsFormatError

from .conftest import DATA, quantized

GOLDEN = (DATA / "golden-v1.sws").read_bytes()
GOLDENS = {v: (DATA / f"golden-v{v}.sws").read_bytes() for v in (1, 2, 3)}


def small_file(version: int = 2) -> bytes:
    return swsformat.encode_bytes({"a.weight": quantized((6, 20), 0.3, 5), "a.bias": torch.ones(6)}, version=version,
                                  smallest=False, index_bits=None)


def rejects(data: bytes, match: str | None = None) -> SwsFormatError:
    with pytest.raises(SwsFormatError, match=match) as info:
        swsformat.load(data)
    return info.value


def rebuild(header: dict, payload: bytes = b"", version: int = 2, coding: int | None = None) -> bytes:
    """A file with a hand-made header and a valid header CRC (to reach the deeper checks)."""
    return pack_head(msgpack.packb(header, use_bin_type=True), version, coding) + payload


def split(data: bytes) -> tuple[dict, bytes]:
    prelude = read_prelude(data)
    return decode_header(data, prelude), data[prelude.data_start :]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_truncation_at_every_offset_is_rejected(version):
    golden = GOLDENS[version]
    for n in range(len(golden)):
        rejects(golden[:n])


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_single_bit_flip_is_detected(version):
    data = small_file(version)
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            rejects(bytes(bad))


@pytest.mark.parametrize("version", [1, 2])
def test_trailing_bytes_rejected(version):
    rejects(GOLDENS[version] + b"\0", "trailing")


@pytest.mark.parametrize("version", [1, 2])
def test_random_bytes_and_mutations_only_raise_sws_errors(version):
    golden = GOLDENS[version]
    rng = random.Random(version)
    for _ in range(300):
        rejects(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))))
    for _ in range(300):
        bad = bytearray(golden)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(bad))
            if op == 0:
                bad[pos] = rng.getrandbits(8)
            elif op == 1:
                del bad[pos]
            else:
                bad.insert(pos, rng.getrandbits(8))
        if bytes(bad) != golden:
            rejects(bytes(bad))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h: h.update(extra=1), "unexpected keys"),
        (lambda h: h.pop("metadata"), "missing keys"),
        (lambda h: h.update(version=3), "version"),
        (lambda h: h["tensors"][0].update(shape=[2**62, 2**62]), "overflow int64"),
        (lambda h: h["tensors"][0].update(shape=[-1, 20]), "non-negative"),
        (lambda h: h["tensors"][0].update(nonzeros=10**6), "nonzeros"),
        (lambda h: h["tensors"][0].update(entries=10**6), "entries"),
        (lambda h: h["tensors"][0].update(index_bits=40), "index_bits"),
        (lambda h: h["tensors"][0].update(codebook=b"\0\0\0\0"), "zero pattern"),
        (lambda h: h["tensors"][0].update(codebook=struct.pack("<f", float("nan"))), "non-finite|code table"),
        (lambda h: h["tensors"][0].update(dtype="complex64"), "dtype"),
        (lambda h: h["tensors"][0]["gaps"].update(coder="zstd"), "coder"),
        (lambda h: h["tensors"][0]["gaps"].update(bits=10**9), "bits"),
        (lambda h: h["tensors"][0]["gaps"]["section"].__setitem__(0, 2**64 - 8), "offset"),
        (lambda h: h["tensors"][0]["gaps"]["section"].__setitem__(1, 2**40), "section of 1099511627776 bytes"),
        (lambda h: h["tensors"][0]["row_counts"].__setitem__(0, 1), "offset"),
        (lambda h: h["tensors"][1].update(name="a.weight"), "duplicate tensor name"),
        (lambda h: h["tensors"][1].update(shape=[7]), "bytes for 7"),
        (lambda h: h.update(tensors={}), "list"),
        (lambda h: h.update(metadata={"k": 1}), "metadata"),
    ],
)
@pytest.mark.parametrize("version", [1, 2])
def test_crafted_headers(mutate, match, version):
    header, payload = split(small_file(version))
    mutate(header)
    rejects(rebuild(header, payload, version), match)


def test_hostile_msgpack():
    # Deep nesting, ext types, non-string keys, duplicate keys, trailing bytes, huge length claims.
    for h in [
        b"\x91" * 100000 + b"\xc0",
        msgpack.packb(msgpack.ExtType(1, b"x")),
        b"\x81\x01\x02",
        b"\x82\xa1a\x01\xa1a\x02",
        msgpack.packb({"a": 1}) + b"\x00",
        b"\xdb\xff\xff\xff\xff",
        b"\xdd\xff\xff\xff\xff",
    ]:
        for version, coding in [(1, 0), (2, 0), (2, 1)]:
            rejects(pack_head(h, version, coding))


def test_bad_prelude():
    rejects(b"PK\x03\x04" + GOLDEN[4:], "magic")
    rejects(GOLDEN[:8] + b"\x04\x00" + GOLDEN[10:], "version 4")
    rejects(GOLDEN[:12] + struct.pack("<I", 2**31), "header length")
    rejects(GOLDEN[:10] + b"\x01\x00" + GOLDEN[12:], "reserved")


def _v2_head(coding: int, reserved: int, stored: bytes, size: int) -> bytes:
    """A version 2 prelude + header + valid CRC with any field values."""
    head = b"\x89SWS\r\n\x1a\n" + struct.pack("<HBBII", 2, coding, reserved, len(stored), size) + stored
    head += struct.pack("<I", zlib.crc32(head))
    return head + bytes(-len(head) % 8)


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def test_bad_v2_prelude_and_deflated_header():
    header = msgpack.packb({"a": 1})
    golden = GOLDENS[2]
    rejects(golden[:10] + b"\x02" + golden[11:], "header coding 2")
    rejects(golden[:11] + b"\x01" + golden[12:], "reserved prelude field at offset 11")
    rejects(golden[:16] + struct.pack("<I", 2**30) + golden[20:], "decoded header length")
    rejects(golden[:16] + struct.pack("<I", 0) + golden[20:], "decoded header length")
    rejects(_v2_head(0, 0, header, len(header) + 1), "differs from stored length")
    rejects(_v2_head(1, 0, b"\xff\xff\xff", 10), "not a valid deflate stream")
    packed = _deflate(header)
    rejects(_v2_head(1, 0, packed, len(header) - 1), "exactly")  # decodes to more than declared
    rejects(_v2_head(1, 0, packed, len(header) + 1), "exactly")  # to fewer
    rejects(_v2_head(1, 0, packed[:-1], len(header)), "exactly|deflate")  # unfinished stream
    rejects(_v2_head(1, 0, packed + b"\0", len(header)), "exactly")  # bytes after its end


def rejects_within(data: bytes, match: str) -> int:
    """Check ``data`` is refused with ``match``; return the peak bytes Python allocated meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        rejects(data, match)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_deflate_bomb_is_not_inflated():
    """A 1 KiB deflate stream of 16 MiB of zeros declared as 100 bytes: refused without
    inflating it (peak memory far below the 16 MiB)."""
    bomb = _deflate(bytes(16 << 20))
    assert len(bomb) < 20000
    assert rejects_within(_v2_head(1, 0, bomb, 100), "exactly") < 4 << 20


@pytest.mark.parametrize("coding", [0, 1])
def test_both_header_codings_read(coding):
    header, payload = split(small_file())
    sd = swsformat.load(rebuild(header, payload, 2, coding))
    assert torch.equal(sd["a.bias"], torch.ones(6))


def _code_table_file(lengths_hex: bytes) -> bytes:
    header, payload = split(small_file())
    header["tensors"][0]["values"]["code"] = lengths_hex
    return rebuild(header, payload)


def test_oversubscribed_and_wrong_codes():
    from swsformat.spec import pack_nibbles

    k = 5  # the values alphabet of small_file(): 4 codebook values + zero
    rejects(_code_table_file(pack_nibbles([1] * k)), "over-subscribed")
    rejects(_code_table_file(pack_nibbles([0] * k)), "no symbol has a code|bits")
    rejects(_code_table_file(pack_nibbles([15] * k)), "bits|no codeword|ends before")


def test_payload_inconsistent_with_valid_checksums():
    """Recompute CRCs after corrupting a stream: the kernel must still catch it."""
    header, payload = split(small_file())
    t = header["tensors"][0]
    off, length, _ = t["gaps"]["section"]
    body = bytearray(payload)
    for i in range(off, off + length):
        body[i] ^= 0xFF
    t["gaps"]["section"][2] = zlib.crc32(bytes(body[off : off + length]))
    rejects(rebuild(header, bytes(body)), "tensor 'a.weight'")


def test_row_counts_inconsistent():
    header, payload = split(small_file())
    t = header["tensors"][0]
    off, length, _ = t["row_counts"]
    body = bytearray(payload)
    body[off] ^= 0x80
    t["row_counts"][2] = zlib.crc32(bytes(body[off : off + length]))
    rejects(rebuild(header, bytes(body)), "row_counts|more entries")


def test_checksum_error_names_the_section():
    header, payload = split(small_file())
    off = header["tensors"][0]["values"]["section"][0]
    body = bytearray(payload)
    body[off] ^= 1
    with pytest.raises(SwsChecksumError, match="'values'"):
        parse(rebuild(header, bytes(body)))


def test_small_file_declaring_huge_tensor_is_refused_quickly():
    sd = {"w.weight": torch.zeros(1, 1)}
    header, payload = split(swsformat.encode_bytes(sd, smallest=False, version=2))
    header["tensors"][0]["shape"] = [1 << 15, 1 << 15]  # 4 GiB of float32, all zeros
    data = rebuild(header, payload)
    assert len(data) < 1024
    assert rejects_within(data, "over the limit") < 4 << 20  # arithmetic only: nothing near 4 GiB allocated


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(SwsFormatError):
        swsformat.load_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError):
        swsformat.load_state_dict(tmp_path / "nope.sws")


def test_atomic_write_failure_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.sws"
    swsformat.encode({"a.weight": torch.zeros(2, 2)}, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("swsformat.files.os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        swsformat.encode({"a.weight": torch.ones(2, 2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.sws"]
    assert np.frombuffer(before[:8], np.uint8).tolist()[1:4] == list(b"SWS")


def test_file_that_does_not_fit_its_architecture_is_a_format_error(tmp_path):
    """A file naming a built-in architecture must hold exactly its tensors, with their shapes."""
    from swsformat.quantize import prune_and_cluster
    from swsformat.retrain.models import build_model

    sd = prune_and_cluster(build_model("lenet300-100").state_dict(), prune=0.9, clusters=8)
    sd.pop("fc3.bias")
    missing = tmp_path / "missing.sws"
    swsformat.encode(sd, missing, architecture="lenet300-100")
    with pytest.raises(swsformat.SwsFormatError, match="do not fit its architecture 'lenet300-100'.*fc3.bias"):
        swsformat.load_model(missing)
    sd["fc3.bias"] = torch.zeros(7)
    wrong = tmp_path / "wrong.sws"
    swsformat.encode(sd, wrong, architecture="lenet300-100")
    with pytest.raises(swsformat.SwsFormatError, match="size mismatch for fc3.bias"):
        swsformat.load_model(wrong)


def test_half_precision_file_gives_a_float32_builtin_model(tmp_path):
    from swsformat.quantize import prune_and_cluster
    from swsformat.retrain.models import build_model

    sd = {k: v.half() for k, v in prune_and_cluster(build_model("lenet300-100").state_dict(), prune=0.9, clusters=8).items()}
    path = tmp_path / "half.sws"
    swsformat.encode(sd, path, architecture="lenet300-100")
    model = swsformat.load_model(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.fc1.weight, sd["fc1.weight"].float())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
