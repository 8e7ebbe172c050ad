"""The one way into a ``.sws`` file: a lazy reader that validates before it allocates.

Every read entry point (``load``, ``load_state_dict``, ``load_model``, ``inspect``,
``read_header``, ``size_report``, the plots and the CLI) goes through :class:`SwsFile`:

1. the prelude is read first and the magic checked before anything else is read;
2. the header is read (at most its declared, bounded size), its structure bounded, its
   schema, limits and section layout validated;
3. the file size must equal what the header declares before any payload is read;
4. before a tensor is decoded its declared output is counted against ``max_output_bytes``,
   and its sections' padding and CRCs are checked; only then do kernels run.

Example:
    >>> with swsformat.open("model.sws") as f:  # doctest: +SKIP
    ...     print(f.keys(), f.metadata())
    ...     w = f.get_tensor("fc1.weight")
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .container import Container, Entry, Tensor, check_padding, decode_header, materialize, read_index, read_prelude
from .container import check_header as _check_header
from .decoder import decode_into, tensor_from_entry
from .errors import SwsConfigError, SwsFormatError
from .spec import MAX_EXPANSION, MAX_PRELUDE, MIN_OUTPUT_LIMIT

PathLike = str | os.PathLike
Source = PathLike | bytes | bytearray | memoryview



def output_limit(file_size: int, max_output_bytes: int | None) -> int:
    """The default limit on decoded bytes: the larger of 64 MiB and 4096 x the file size."""
    return max_output_bytes if max_output_bytes is not None else max(MIN_OUTPUT_LIMIT, MAX_EXPANSION * file_size)


def _read_upto(f: Any, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at end of file), however the file returns them."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(min(n - got, 1 << 24))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _pread(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, min(n - got, 1 << 30), offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class SwsFile:
    """A validated ``.sws`` file whose tensors are decoded one at a time, on request.

    Opening costs the prelude and the header (nothing past them is read); use it as a
    context manager or call :meth:`close` to release the file.
    """

    def __init__(self, source: Source, *, max_output_bytes: int | None = None) -> None:
        self._fd: int | None = None
        self._stream: Any = None  # a pipe or device, read once when the payload is needed
        self._data: memoryview | None = None  # the data area, when it is in memory
        self._decoded = 0
        self.name = "<bytes>" if isinstance(source, bytes | bytearray | memoryview) else os.fsdecode(source)
        if isinstance(source, bytes | bytearray | memoryview):
            self._open_bytes(memoryview(source).cast("B"))
        else:
            self._open_path(source)
        # A stream's size is what its header claims, so it gets no expansion allowance.
        size = 0 if self._stream is not None else self.header.file_size
        self.limit = output_limit(size, max_output_bytes)
        self._by_name = {e.name: e for e in self.header.entries}

    def _open_bytes(self, mv: memoryview) -> None:
        self.header = h = read_index(mv)
        if len(mv) < h.data_start:
            raise SwsFormatError(f"file truncated before the data area at offset {h.data_start}")
        check_padding(mv, h)
        self._check_size(len(mv))
        self._data = mv[h.data_start :]

    def _open_path(self, path: PathLike) -> None:
        name = os.fsdecode(path)
        try:
            # Non-blocking open: a FIFO without a writer must not block here (reads then see EOF).
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except IsADirectoryError:
            raise SwsFormatError(f"{name}: is a directory, not a .sws file") from None
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise SwsFormatError(f"{name}: is a directory, not a .sws file")
        f = os.fdopen(fd, "rb", buffering=0)
        try:
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            head = _read_upto(f, MAX_PRELUDE)
            prelude = read_prelude(head)  # the magic, before reading any further
            head += _read_upto(f, prelude.data_start - len(head))
            header = _check_header(decode_header(head, prelude), prelude)
            if len(head) < header.data_start:
                raise SwsFormatError(f"file truncated before the data area at offset {header.data_start}")
            check_padding(head, header)
            self.header = header
            if stat.S_ISREG(st.st_mode):
                self._check_size(st.st_size)
            else:  # a pipe or device: its payload is read when it is asked for (see _load_all)
                self._stream, f = f, None
                return
            self._fd = os.dup(fd)
        finally:
            if f is not None:
                f.close()

    def _check_size(self, size: int) -> None:
        want = self.header.file_size
        if size < want:
            raise SwsFormatError(f"file truncated: {size} bytes, its sections end at {want}")
        if size > want:
            raise SwsFormatError(f"{size - want} trailing bytes after the last section (file of {size}, expected {want})")

    # -------------------------------------------------------------------- facts (header only)

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def architecture(self) -> dict[str, Any] | None:
        """``{"name", "kwargs"}`` of the registered model the file fills, or None."""
        return self.header.architecture

    def metadata(self) -> dict[str, str]:
        return dict(self.header.metadata)

    def input_spec(self) -> dict[str, Any] | None:
        """What the model expects as input (metadata ``sws.input``, written by ``sws compress``):
        ``data``, ``normalization`` ('unit' or 'standard'), and in newer files ``shape``,
        ``scale`` (raw pixel to [0, 1]), ``mean`` and ``std``; None when the file has no record."""
        return parse_input_spec(self.header.metadata)

    def keys(self) -> list[str]:
        return [e.name for e in self.header.entries]

    def entry(self, name: str) -> Entry:
        """Header facts of one tensor (shape, dtype, kind, sizes), without decoding it."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.name} holds no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.header.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    # ------------------------------------------------------------------------- payload

    def _reserve(self, entries: list[Entry], extra: int = 0) -> None:
        total = self._decoded + sum(e.output_bytes for e in entries) + extra
        if total > self.limit:
            raise SwsFormatError(
                f"tensors declare {total} decoded bytes, over the limit of {self.limit} for a "
                f"{self.header.file_size}-byte file; pass max_output_bytes= (CLI: --max-output-bytes) "
                "to allow it if you trust the file"
            )
        self._decoded = total

    def _chunk(self, e: Entry) -> bytes | memoryview:
        if self._stream is not None:
            self._load_all()
        if self._data is not None:
            return self._data[e.start : e.end]
        if self._fd is None:
            raise ValueError(f"{self.name} is closed")
        return _pread(self._fd, e.end - e.start, self.header.data_start + e.start)

    def _load_all(self) -> None:
        length = self.header.data_length
        if self._stream is not None:
            # A stream has no size to check against the header first, so the declared data
            # area must fit the output limit (stored bytes never exceed a few times the
            # decoded ones for a valid file) before it is read.
            if length > self.limit:
                raise SwsFormatError(
                    f"{self.name}: declares {length} data bytes, over the limit of {self.limit} for a stream; "
                    "pass max_output_bytes= (CLI: --max-output-bytes) to allow it"
                )
            stream, self._stream = self._stream, None
            try:
                data = _read_upto(stream, length + 1)
            finally:
                stream.close()
            self._check_size(self.header.data_start + len(data))
            self._data = memoryview(data)
        elif self._data is None and self._fd is not None:
            data = _pread(self._fd, length, self.header.data_start)
            if len(data) != length:
                raise SwsFormatError(f"file truncated while reading: {len(data)} of {length} data bytes")
            self._data = memoryview(data)

    def tensor(self, name: str) -> Tensor:
        """The validated container tensor (codebook, streams, raw bytes), counted against the
        output limit: what reports and plots work from."""
        e = self.entry(name)
        self._reserve([e])
        return materialize(e, self._chunk(e))

    def get_tensor(self, name: str, device: torch.device | str = "cpu", sparse: bool = False) -> torch.Tensor:
        """Decode one tensor (reading only its own bytes); with ``sparse`` a coded tensor of
        2+ dimensions comes back as ``torch.sparse_csr_tensor`` of its 2-D view
        ``(shape[0], prod(shape[1:]))``. An alias decodes the tensor it names."""
        e = self.entry(name)
        if e.alias_of is not None:
            e = self.entry(e.alias_of)
        return tensor_from_entry(self.tensor(e.name), device, sparse)

    def state_dict(self, device: torch.device | str = "cpu", sparse: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor, decoded (the whole output is checked against the limit first).
        Tied tensors (aliases) come back as one tensor object under each of their names."""
        return self._decode(device, sparse, {})

    def state_dict_into(self, module: nn.Module, strict: bool = True) -> dict[str, torch.Tensor]:
        """Like :meth:`state_dict`, but tensors that match one of ``module``'s parameters or
        buffers (CPU, same dtype and shape, contiguous) are decoded into it in place; the
        returned dict holds those parameters themselves, so ``module.load_state_dict`` of it
        copies nothing for them. Nothing is written into the module unless every shape fits
        and, with ``strict``, the names are the module's own: a load that is going to fail
        leaves the module as it was."""
        targets = module.state_dict(keep_vars=True)
        ties = ties_to(targets, set(self._by_name))
        fits = all(tuple(targets[e.name].shape) == e.shape for e in self.header.entries if e.name in targets)
        if not fits or (strict and set(targets) != set(self._by_name) | set(ties)):
            targets = {}
        # Names the module ties (one storage) that the file holds as separate tensors: decoding
        # both into the one storage at once would leave whichever thread ends last. They are
        # decoded apart and copied in file order by load_state_dict (the last one stays).
        by_storage: dict[int, list[str]] = {}
        for e in self.header.entries:
            t = targets.get(e.name)
            if e.alias_of is None and t is not None and t.numel():
                by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(e.name)
        clashes = [names for names in by_storage.values() if len(names) > 1]
        if clashes:
            warnings.warn("the module ties " + "; ".join(" and ".join(map(repr, n)) for n in clashes) + ", which the "
                          "file holds as separate tensors: the tied parameter gets the last of them", stacklevel=3)
            clashed = {n for names in clashes for n in names}
            targets = {k: v for k, v in targets.items() if k not in clashed}
        sd = self._decode("cpu", False, targets)
        return {**sd, **{missing: sd[held] for missing, held in ties.items()}}

    def _decode(self, device: torch.device | str, sparse: bool, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._reserve(self.header.entries)
        self._load_all()
        own = [e for e in self.header.entries if e.alias_of is None]
        tensors = [materialize(e, self._chunk(e)) for e in own]
        decoded = dict(zip((e.name for e in own), _decode_all(tensors, device, sparse, [targets.get(e.name) for e in own])))
        return {e.name: decoded[e.alias_of if e.alias_of is not None else e.name] for e in self.header.entries}

    def container(self) -> Container:
        """The whole file as a :class:`Container` (all sections read and checked)."""
        self._reserve(self.header.entries)
        self._load_all()
        return self.header.container([materialize(e, self._chunk(e)) for e in self.header.entries])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> SwsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def ties_to(targets: Mapping[str, torch.Tensor], held: set[str]) -> dict[str, str]:
    """``{name: tied name}`` for the module's tensors the file leaves out because the module
    ties them to one it holds (a Hugging Face ``save_pretrained`` folder drops ``lm_head.weight``,
    tied to the embedding): the tie gives them their value."""
    by_object = {id(t): n for n, t in targets.items() if n in held}
    return {n: by_object[id(t)] for n, t in targets.items() if n not in held and id(t) in by_object}


def _decode_all(tensors: list[Tensor], device: torch.device | str, sparse: bool,
                targets: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Decode tensors on up to ``torch.get_num_threads()`` threads (the kernels release the
    GIL), largest first so that one big tensor does not start last; into ``targets[i]``
    where :func:`~swsformat.decoder.decode_into` can."""

    def one(i: int) -> torch.Tensor:
        target = targets[i]
        if target is not None and decode_into(tensors[i], target):
            return target
        return tensor_from_entry(tensors[i], device, sparse)

    workers = min(torch.get_num_threads(), len(tensors))
    if workers <= 1:
        return [one(i) for i in range(len(tensors))]
    from concurrent.futures import ThreadPoolExecutor

    order = sorted(range(len(tensors)), key=lambda i: -math.prod(tensors[i].shape))
    out: list[torch.Tensor | None] = [None] * len(tensors)
    with ThreadPoolExecutor(workers) as pool:
        for i, t in zip(order, pool.map(one, order)):
            out[i] = t
    return out  # type: ignore[return-value]


def open(source: Source, *, max_output_bytes: int | None = None) -> SwsFile:  # noqa: A001 - like safetensors' safe_open
    """Open a ``.sws`` file (a path, or its bytes) lazily: O(header) now, tensors on request.

    ``max_output_bytes`` bounds the bytes decoded through this reader (default: the larger
    of 64 MiB and 4096 times the file size); raise it for files you trust.
    """
    return SwsFile(source, max_output_bytes=max_output_bytes)


def load(
    data: bytes, device: torch.device | str = "cpu", sparse: bool = False, max_output_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Decode ``.sws`` bytes into a state_dict (see :func:`load_state_dict`)."""
    return SwsFile(data, max_output_bytes=max_output_bytes).state_dict(device, sparse)


def load_state_dict(
    path: PathLike, device: torch.device | str = "cpu", sparse: bool = False, max_output_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Load a ``.sws`` file into a state_dict of tensors on ``device``.

    Args:
        path: the file.
        device: torch device for every tensor.
        sparse: return coded tensors of 2+ dimensions as ``torch.sparse_csr_tensor`` of
            their 2-D view ``(shape[0], prod(shape[1:]))``; a kernel's own shape is in the
            tensor's ``sws_shape`` attribute, which ``encode`` of this state_dict uses.
        max_output_bytes: refuse files that decode to more bytes (default: the larger of
            64 MiB and 4096 times the file size).

    Example:
        >>> import swsformat
        >>> sd = swsformat.load_state_dict("/tmp/tiny.sws")  # doctest: +SKIP
    """
    with SwsFile(path, max_output_bytes=max_output_bytes) as f:
        return f.state_dict(device, sparse)


def read_container(path: PathLike, max_output_bytes: int | None = None) -> Container:
    """Parse and validate a whole file without decoding its payload streams."""
    with SwsFile(path, max_output_bytes=max_output_bytes) as f:
        return f.container()


def read_header(path: PathLike) -> dict[str, Any]:
    """The validated header map (prelude and header only; nothing past them is read)."""
    with SwsFile(path) as f:
        return f.header.header_map()


def _short(obj: Any, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def build_architecture(arch: Mapping[str, Any] | None) -> nn.Module:
    """Instantiate the architecture a file names (one of the built-in registry)."""
    from .architectures import ARCHITECTURES as MODELS

    if arch is None:
        raise SwsFormatError("the file names no architecture: pass your module, load_model(path, module)")
    name, kwargs = arch["name"], arch["kwargs"]
    if name not in MODELS:
        raise SwsFormatError(f"the file's architecture {_short(name)} is not registered; known: {sorted(MODELS)}")
    try:
        with warnings.catch_warnings():  # e.g. torch's notes on zero-element parameters
            warnings.simplefilter("ignore")
            return MODELS[name](**kwargs)
    except Exception as exc:  # a constructor given hostile kwargs may raise anything
        raise SwsFormatError(
            f"cannot build the file's architecture {name!r} with kwargs {_short(kwargs)}: {type(exc).__name__}: {exc}"
        ) from None


INPUT_KEY = "sws.input"


def parse_input_spec(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The validated ``sws.input`` record of a file's metadata (see :meth:`SwsFile.input_spec`)."""
    import json
    import math

    if INPUT_KEY not in metadata:
        return None
    try:
        spec = json.loads(metadata[INPUT_KEY])
    except ValueError:
        spec = None
    def number(v: Any, low: float) -> bool:
        try:
            return type(v) in (int, float) and math.isfinite(float(v)) and abs(float(v)) < 1e30 and float(v) >= low
        except OverflowError:
            return False

    bad = not isinstance(spec, dict) or spec.get("normalization") not in ("unit", "standard")
    if not bad and ("mean" in spec or "std" in spec):
        bad = not (number(spec.get("mean"), -1e30) and number(spec.get("std"), 1e-12))
    if not bad and "scale" in spec:
        bad = not number(spec["scale"], 1e-12)
    if not bad and "shape" in spec:
        shape = spec["shape"]
        bad = not (isinstance(shape, list) and 1 <= len(shape) <= MAX_INPUT_DIMS
                   and all(type(d) is int and 0 < d <= MAX_INPUT_ELEMENTS for d in shape)
                   and math.prod(shape) <= MAX_INPUT_ELEMENTS)
    if bad:
        raise SwsFormatError(
            f"metadata {INPUT_KEY!r} is not an input record (normalization 'unit' or 'standard', finite mean, "
            f"std >= 1e-12, a shape of 1-{MAX_INPUT_DIMS} positive sizes of at most {MAX_INPUT_ELEMENTS} elements); "
            "the tensors are unaffected: load them without normalize_inputs"
        )
    return spec


# Bounds of a plausible input shape in an input record (a file cannot make readers allocate).
MAX_INPUT_DIMS = 8
MAX_INPUT_ELEMENTS = 1 << 24


def _normalizing_hook(mean: float, std: float):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return ((args[0] - mean) / std,) + tuple(args[1:])

    return hook


def _check_target(module: nn.Module | None, device: torch.device | str) -> None:
    """Misuse that would otherwise surface as a torch error deep inside loading."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SwsConfigError(f"device {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SwsConfigError(f"device {device!r}: this torch has no CUDA device; load on 'cpu'")
    if module is None:
        return
    if not isinstance(module, nn.Module):
        raise SwsConfigError(f"module must be your built torch.nn.Module, got {type(module).__name__} {module!r:.60}; "
                             "for the file's own architecture leave it out (load_model(path))")
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for n, t in named:
            if nn.parameter.is_lazy(t):
                raise SwsConfigError(f"{kind} {n!r} is not initialised yet (a lazy layer): run one forward pass "
                                     "on an example input before load_model")
            if t.is_meta:
                raise SwsConfigError(f"{kind} {n!r} is on the meta device: build the module on the CPU (or "
                                     "your device) before load_model; a module built on the meta device has no "
                                     "values for the buffers a file does not hold (non-persistent ones)")


def name_differences(module: nn.Module, held: set[str]) -> tuple[list[str], list[str]]:
    """``(missing, extra)``: ``module``'s state_dict names absent from ``held`` (a file's or a
    checkpoint's; ties the module fills count as present, :func:`ties_to`), and names of ``held``
    the module lacks."""
    targets = module.state_dict(keep_vars=True)
    return sorted(set(targets) - held - set(ties_to(targets, held))), sorted(held - set(targets))


def describe_differences(missing: list[str], extra: list[str], held: str = "file") -> str:
    """:func:`name_differences` in a short sentence: counts and three names of each side."""

    def some(names: list[str]) -> str:
        return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    parts = ([f"{len(missing)} of the module's tensors are not in the {held} ({some(missing)})"] if missing else []) + (
        [f"{len(extra)} of the {held}'s are not in the module ({some(extra)})"] if extra else [])
    return "; ".join(parts)


def load_model(
    path: PathLike,
    module: nn.Module | None = None,
    device: torch.device | str = "cpu",
    sparse: bool | str = False,
    strict: bool = True,
    max_output_bytes: int | None = None,
    batch_size: int = 1,
    normalize_inputs: bool = False,
) -> nn.Module:
    """Load a ``.sws`` file into ``module`` (or the file's built-in architecture) in eval mode.

    ``sparse=True`` runs every linear and conv layer that has a correct CSR kernel on the
    device on CSR weights (the others stay dense, named in a warning); ``sparse="auto"`` only
    those where CSR was measured faster for their density, the device and ``batch_size``
    (see :mod:`swsformat.sparse`). The choice per layer is in ``module.sws_layouts``.
    ``strict`` is passed to ``load_state_dict``; missing or unexpected keys raise.

    The input the model was trained on (e.g. MNIST standardised with mean 0.1307, std
    0.3081) is in ``module.sws_input`` (None if the file does not say). With
    ``normalize_inputs=True`` the model takes inputs scaled to [0, 1] and applies
    ``(x - mean) / std`` itself, so images need no other preprocessing.
    """
    if sparse not in (False, True, "auto"):
        raise ValueError(f"sparse must be False, True or 'auto', got {sparse!r}")
    _check_target(module, device)
    with SwsFile(path, max_output_bytes=max_output_bytes) as f:
        arch = f.architecture
        try:
            spec = f.input_spec()
        except SwsFormatError:
            if normalize_inputs:
                raise
            warnings.warn(f"{INPUT_KEY} metadata ignored: not a valid input record", stacklevel=2)
            spec = None
        if normalize_inputs and (spec is None or "mean" not in spec):
            raise SwsFormatError(
                "normalize_inputs=True: the file records no input mean and std (metadata 'sws.input'); "
                "normalize the inputs yourself"
            )
        if module is None:
            # Built on the meta device: no random initialisation of weights that are replaced
            # at once; the decoded tensors become the parameters, in the architecture's own
            # dtypes (a float16 file still gives a float32 model, whose bytes count too).
            with torch.device("meta"):
                built = build_architecture(arch)
            ref = built.state_dict()
            f._reserve([], extra=sum(t.numel() * t.element_size() for t in ref.values()))
            sd = f.state_dict()
            sd = {k: v.to(ref[k].dtype) if k in ref else v for k, v in sd.items()}
            target, name = built, f"its architecture {arch['name']!r}"
        else:
            name = f"the module ({type(module).__name__})"
            missing, extra = name_differences(module, set(f.keys())) if strict else ([], [])
            if missing or extra:  # before any decoding
                hint = ("the names differ: a file encoded from a checkpoint saved under other names (an older "
                        "transformers version's) fits a module built under those; or encode the loaded model itself "
                        "(swsformat.encode(model, ...)), or pass strict=False") if missing and extra else (
                        "pass strict=False to load what fits")
                raise SwsFormatError(f"the file's tensors do not fit {name}: {describe_differences(missing, extra)}; "
                                     f"{hint}")
            # Decoded straight into the module's own tensors where they match (no second copy).
            sd, target = f.state_dict_into(module, strict), module
        try:
            target.load_state_dict(sd, strict=True if module is None else strict, assign=module is None)
        except RuntimeError as e:
            detail = " ".join(str(e).split())
            detail = detail if len(detail) <= 400 else detail[:400] + " ..."
            raise SwsFormatError(f"the file's tensors do not fit {name}: {detail}") from None
        module = target.to(device).eval()
        if sparse:
            from .sparse import sparsify_

            def coded_csr(name: str) -> torch.Tensor | None:
                """The file's own CSR decode of a coded weight (no dense detour)."""
                e = f._by_name.get(name)
                if e is not None and e.alias_of is not None:
                    e = f._by_name[e.alias_of]
                if e is None or e.kind != "sws" or len(e.shape) < 2:
                    return None
                # Already counted against the output limit by the state_dict above.
                return tensor_from_entry(materialize(e, f._chunk(e)), device, sparse=True)

            layouts = sparsify_(module, sparse, batch_size, csr=coded_csr)
    old = getattr(module, "_sws_normalizer", None)
    if old is not None:  # loading again into the same module: one normalization, not two
        old.remove()
        module._sws_normalizer = None
    module.sws_input = spec
    if normalize_inputs:
        module._sws_normalizer = module.register_forward_pre_hook(
            _normalizing_hook(float(spec["mean"]), float(spec["std"]))
        )
        # The model now takes inputs scaled to [0, 1]: say so, so nobody normalizes twice.
        module.sws_input = {**spec, "applied_by_model": True}
    if sparse:
        module.sws_layouts = layouts
        dense = sorted(k for k, v in layouts.items() if v.startswith("dense") and v != "dense: empty weight" and sparse is True)
        if dense:
            names = ", ".join(k or "the model itself" for k in dense)
            warnings.warn(f"layers kept dense (no CSR kernel for them here): {names}", stacklevel=2)
    return module


__all__ = [
    "SwsFile",
    "build_architecture",
    "load",
    "load_model",
    "load_state_dict",
    "open",
    "output_limit",
    "read_container",
    "read_header",
]
