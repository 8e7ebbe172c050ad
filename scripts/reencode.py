"""Re-encode committed ``.sws`` files without changing what they compute: at the current
format version (``--version``), optionally with ``smallest=True`` (``--smallest``: tensors
that do not get smaller when coded are stored raw) and with exact pruning
(``--remove-dead``: weights and biases that cannot change the output are zeroed, proven by
bit-identical logits on the whole test set of the file's data).

Before writing, the script checks that re-encoding at the file's own version reproduces its
bytes exactly (with its library string) and, after re-encoding, that every tensor decodes
bit-identical (or, with ``--remove-dead``, that every logit on the test set is); otherwise
the file is left unchanged. With ``--json`` the results JSON beside each file is updated
(sizes, rates, non-zero fraction, and a ``reencoded`` record of this command).

    python scripts/reencode.py results/paper/*.sws
    python scripts/reencode.py --remove-dead --data-root ../shared/data/mnist --json results/paper/*.sws
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import swsformat
from swsformat.container import parse, serialize
from swsformat.encoder import to_container
from swsformat.files import atomic_write
from swsformat.provenance import provenance
from swsformat.reader import build_architecture
from swsformat.spec import FORMAT_VERSION, VERSIONS

ROOT = Path(__file__).resolve().parent.parent


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def _logits(data: bytes, test_x: torch.Tensor) -> torch.Tensor:
    """The logits of the model a file's bytes describe (its named architecture)."""
    model = build_architecture(swsformat.open(data).architecture).eval()
    model.load_state_dict(swsformat.load(data))
    with torch.no_grad():
        return torch.cat([model(x) for x in test_x.split(1000)])


def remove_dead(path: Path, sd: dict[str, torch.Tensor], data_root: str | None) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    """The file's tensors with exact pruning applied (in their own dtypes), the number of
    non-zeros removed, and the test inputs it was proven on."""
    from swsformat.exact import remove_dead_units_verified_
    from swsformat.retrain import data as D

    f = swsformat.open(path)
    spec = f.input_spec()
    if spec is None:
        raise SystemExit(f"{path}: no input record, so no test set to prove exact pruning on")
    _, test = D.load(spec["data"], root=data_root, download=False, normalization=spec["normalization"])
    model = swsformat.load_model(path)
    removed = remove_dead_units_verified_(model, test.x)
    new = {k: v.to(sd[k].dtype) for k, v in model.state_dict().items()}
    return new, sum(removed.values()), test.x


def reencode(path: Path, version: int, smallest: bool, dead: bool, data_root: str | None) -> dict:
    original = path.read_bytes()
    c = parse(original)
    sd = swsformat.load(original)
    bits = {t.name: getattr(t, "index_bits", None) for t in c.tensors if t.kind == "sws"}
    kwargs = dict(compress=set(bits), metadata=c.metadata, architecture=c.architecture)
    if c.version < 3:
        same = to_container(sd, version=c.version, index_bits=bits, **kwargs)
        same.library = c.library
        if serialize(same) != original:
            raise SystemExit(f"{path}: re-encoding does not reproduce the file; left unchanged")
    removed, test_x = 0, None
    if dead:
        sd, removed, test_x = remove_dead(path, sd, data_root)
    data = serialize(to_container(sd, version=version, smallest=smallest, index_bits="auto", **kwargs))
    again = swsformat.load(data)
    for name, t in sd.items():
        if not _same(t, again[name]):
            raise SystemExit(f"{path}: {name} changed; left unchanged")
    if test_x is not None and not torch.equal(_logits(original, test_x), _logits(data, test_x)):
        raise SystemExit(f"{path}: the logits changed; left unchanged")
    atomic_write(path, data)
    return {"before": len(original), "after": len(data), "dead_removed": removed}


def update_json(path: Path, r: dict, argv: list[str], made_by: dict) -> None:
    j = path.with_suffix(".json")
    if not j.exists():
        return
    record = json.loads(j.read_text())
    rep = swsformat.size_report(path)
    record.update(
        file_bytes=rep["file_bytes"], compression_rate=rep["compression_rate"],
        paper_compression_rate=rep["paper_compression_rate"], nonzero_fraction=rep["nonzero_fraction"],
    )
    if r["dead_removed"]:
        record["config"]["remove_dead"] = True
        record["dead_removed"] = r["dead_removed"]
    earlier = record.get("reencoded")
    record["reencoded"] = {
        "command": "python scripts/reencode.py " + " ".join(argv),
        "bytes_before": r["before"],
        "note": "same training run; the weights are the committed file's"
                + (", exact pruning proven by bit-identical logits on the whole test set" if r["dead_removed"] else
                   ", every tensor decodes bit-identical") + ", so the errors above still hold",
        "provenance": made_by,
    }
    if earlier:
        record["reencoded"]["earlier"] = earlier
    j.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--version", type=int, default=FORMAT_VERSION, choices=VERSIONS)
    p.add_argument("--smallest", action="store_true")
    p.add_argument("--remove-dead", action="store_true")
    p.add_argument("--data-root", default=None, help="folder holding the test set (MNIST IDX files)")
    p.add_argument("--json", action="store_true", help="update the results JSON beside each file")
    a = p.parse_args(argv)
    made_by = provenance(ROOT)  # before this command's own writes make the tree dirty
    for f in a.files:
        r = reencode(f, a.version, a.smallest, a.remove_dead, a.data_root)
        if a.json:
            update_json(f, r, argv, made_by)
        print(f"{f}: {r['before']} -> {r['after']} bytes (format version {a.version}, "
              f"{r['dead_removed']} non-zeros that cannot change the output removed)")


if __name__ == "__main__":
    main()
