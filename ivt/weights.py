"""Where pretrained weights come from: a local file, a released checkpoint by name, or a URL.

`resolve_pretrained(spec)` turns what a user passes as `--pretrained` into a local file path:

    None or "none"              random init: None
    an existing file            that file, as it is
    a name in RELEASES          the release's file, downloaded into the cache once
    http(s)://.../FILE.pth      FILE.pth, downloaded into the cache once; a `#sha256=<hex>`
                                fragment pins the file's SHA-256 (whole or a prefix)

The cache is `$IVT_CACHE` (default `~/.cache/ivt`); a file is stored there under the URL's host
and path (`cache_path`) and used from there on without touching the network. A hand-downloaded file put at that path
is used as it is (after the pinned hash check, where one is pinned).
"""
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from tqdm import tqdm

TIMEOUT_S = 30.0        # connecting and every read: an offline machine fails fast, never hangs
CHUNK = 1 << 20         # bytes read, written and hashed per step


class WeightsError(ValueError):
    """Pretrained weights that cannot be found, downloaded or verified; the message names the
    URL and, where a hand download helps, the path to put the file at."""


@dataclass(frozen=True)
class Release:
    """A released checkpoint: where it is downloaded from, its state-dict layout, the page that
    publishes it, what it is, and the SHA-256 it must have (whole or a prefix; None: unknown)."""
    url: str
    layout: str
    source: str
    description: str
    sha256: Optional[str] = None

    @property
    def file_name(self) -> str:
        return url_file_name(self.url)


SWIN_RELEASE = "https://github.com/microsoft/Swin-Transformer"
SWIN_STORAGE = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
EVA02_RELEASE = "https://github.com/baaivision/EVA/tree/master/EVA-02/asuka"
EVA02_STORAGE = "https://huggingface.co/Yuxin-CV/EVA-02/resolve/main/eva02/pt/"
DINOV2_RELEASE = "https://github.com/facebookresearch/dinov2"
DINOV2_STORAGE = "https://dl.fbaipublicfiles.com/dinov2/"
MAE_RELEASE = "https://github.com/facebookresearch/mae"
MAE_STORAGE = "https://dl.fbaipublicfiles.com/mae/pretrain/"

# Backbone names map to their own release (the scripts' default `--pretrained`). Only mmdet's
# file carries a known hash: mmdet names a published checkpoint `<name>-<first 8 hex digits of
# its SHA-256>.pth` (mmdet's tools/model_converters/publish_model.py).
RELEASES: Dict[str, Release] = {
    "swin_t": Release(SWIN_STORAGE + "swin_tiny_patch4_window7_224.pth",
                      "Swin release ({'model': ...})", SWIN_RELEASE, "Swin-T, ImageNet-1K, 224"),
    "swin_s": Release(SWIN_STORAGE + "swin_small_patch4_window7_224.pth",
                      "Swin release ({'model': ...})", SWIN_RELEASE, "Swin-S, ImageNet-1K, 224"),
    "swin_b": Release(SWIN_STORAGE + "swin_base_patch4_window12_384_22k.pth",
                      "Swin release ({'model': ...})", SWIN_RELEASE, "Swin-B, ImageNet-22K, 384"),
    "swin_l": Release(SWIN_STORAGE + "swin_large_patch4_window12_384_22k.pth",
                      "Swin release ({'model': ...})", SWIN_RELEASE,
                      "Swin-L, ImageNet-22K, 384 (the paper's)"),
    "eva02_b": Release(EVA02_STORAGE + "eva02_B_pt_in21k_p14.pt",
                       "EVA-02 release ({'module': ...})", EVA02_RELEASE,
                       "EVA02-B, MIM on ImageNet-21K, patch 14"),
    "eva02_l": Release(EVA02_STORAGE + "eva02_L_pt_m38m_p14.pt",
                       "EVA-02 release ({'module': ...})", EVA02_RELEASE,
                       "EVA02-L, MIM on Merged-38M, patch 14 (the paper's)"),
    "dinov2_b": Release(DINOV2_STORAGE + "dinov2_vitb14/dinov2_vitb14_pretrain.pth",
                        "DINOv2 release (plain state dict)", DINOV2_RELEASE,
                        "DINOv2 ViT-B/14, LVD-142M"),
    "dinov2_l": Release(DINOV2_STORAGE + "dinov2_vitl14/dinov2_vitl14_pretrain.pth",
                        "DINOv2 release (plain state dict)", DINOV2_RELEASE,
                        "DINOv2 ViT-L/14, LVD-142M"),
    "dinov2_b_reg": Release(DINOV2_STORAGE + "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
                            "DINOv2 release (plain state dict, register_tokens)", DINOV2_RELEASE,
                            "DINOv2 ViT-B/14 with 4 registers, LVD-142M"),
    "dinov2_l_reg": Release(DINOV2_STORAGE + "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
                            "DINOv2 release (plain state dict, register_tokens)", DINOV2_RELEASE,
                            "DINOv2 ViT-L/14 with 4 registers, LVD-142M"),
    "mae_b": Release(MAE_STORAGE + "mae_pretrain_vit_base.pth", "MAE release ({'model': ...})",
                     MAE_RELEASE, "MAE ViT-B/16, ImageNet-1K, encoder"),
    "mae_l": Release(MAE_STORAGE + "mae_pretrain_vit_large.pth", "MAE release ({'model': ...})",
                     MAE_RELEASE, "MAE ViT-L/16, ImageNet-1K, encoder (GoPT's backbone)"),
    "dino_swin_l": Release(
        "https://github.com/RistoranteRist/mmlab-weights/releases/download/dino-swinl/"
        "dino-5scale_swin-l_8xb2-36e_coco-5486e051.pth",
        "mmdet detector ({'state_dict': ...}, backbone.* in mmdet's Swin names)",
        "https://github.com/open-mmlab/mmdetection/tree/main/configs/dino",
        "DINO 5-scale Swin-L, 36 epochs on COCO (its Swin-L backbone)", sha256="5486e051"),
}


def cache_dir() -> Path:
    """The download cache: `$IVT_CACHE`, default `~/.cache/ivt`."""
    return Path(os.environ.get("IVT_CACHE") or Path.home() / ".cache" / "ivt")


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def url_file_name(url: str) -> str:
    """The file name a URL's path ends with (query and fragment ignored)."""
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if not name:
        raise WeightsError(f"{url}: the URL does not end with a file name")
    return name


def cache_path(url: str) -> Path:
    """Where `url` is cached: `cache_dir()/<host>/<path>`, so that two URLs ending in the same
    file name (every Hugging Face file is `.../resolve/main/model.safetensors`) never share a
    cached file. The query and fragment are ignored."""
    parts = urllib.parse.urlsplit(url)
    folders = [urllib.parse.unquote(p) for p in parts.path.split("/")[:-1] if p]
    if not parts.netloc or any(f in (".", "..") or "/" in f or "\\" in f for f in folders):
        raise WeightsError(f"{url}: expected an http(s) URL of a file (no '.', '..' or encoded "
                           f"slash as a folder: the cached copy must stay in {cache_dir()})")
    return cache_dir().joinpath(parts.netloc.replace(":", "_"), *folders, url_file_name(url))


def split_sha256(url: str):
    """'https://host/f.pth#sha256=abc...' -> ('https://host/f.pth', 'abc...'); no fragment: None.
    The hash is hex, whole (64 digits) or a prefix of at least 8."""
    base, _, fragment = url.partition("#")
    if not fragment:
        return base, None
    m = re.fullmatch(r"sha256=([0-9a-fA-F]{8,64})", fragment)
    if not m:
        raise WeightsError(f"{url}: expected a '#sha256=<8 to 64 hex digits>' fragment, "
                           f"got '#{fragment}'")
    return base, m.group(1).lower()


def describe_expected(sha256: str) -> str:
    return sha256 if len(sha256) == 64 else f"one starting with {sha256}"


def resolve_pretrained(spec: Optional[str], progress: bool = True) -> Optional[str]:
    """`--pretrained` (FILE, NAME, URL or 'none') -> the local file to load, or None (random).

    Names and URLs are downloaded into `cache_path(url)`, only when that file is not there yet;
    a pinned hash (a release's, or a URL's `#sha256=` fragment) is checked on the cached file
    too. `progress`: show a download progress bar. Anything else is a FileNotFoundError listing
    the release names; a failed download a WeightsError.
    """
    if spec is None or spec == "none":
        return None
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        raise FileNotFoundError(f"{spec} is a folder; give the pretrained checkpoint file in it")
    if os.path.isfile(spec):
        return os.path.abspath(spec)     # saved so: a run resumes from any working directory
    if spec in RELEASES:
        release = RELEASES[spec]
        return fetch(release.url, release.sha256, spec, progress)
    if is_url(spec):
        url, sha256 = split_sha256(spec)
        return fetch(url, sha256, url_file_name(url), progress)
    raise FileNotFoundError(f"{spec}: file not found, and not a released checkpoint "
                            f"({', '.join(RELEASES)}) nor an http(s) URL")


def saved_pretrained(config: dict, progress: bool = True) -> Optional[str]:
    """The pretrained file a run's configuration (`pretrained`: the file used, `pretrained_source`:
    what named it) points to on this machine: the saved file, or, when it is not here and the run
    named a release or a URL, that one (from the cache, downloaded if absent). The caller checks
    the file's SHA-256 against the checkpoint's."""
    saved, source = config.get("pretrained"), config.get("pretrained_source")
    if (saved is None or not os.path.isfile(saved)) and source and (
            source in RELEASES or is_url(source)):
        return resolve_pretrained(source, progress)
    return saved


def fetch(url: str, sha256: Optional[str], label: str, progress: bool = True) -> str:
    """The cached copy of `url` (downloaded first if absent), checked against `sha256` if given.
    Processes fetching the same file (the ranks of a torchrun job, two runs) take turns
    (`cache_lock`): one downloads, the others then find the file."""
    dest = cache_path(url)
    if not dest.is_file():
        with cache_lock(dest, label, progress):
            if not dest.is_file():
                download(url, dest, sha256, label, progress)
                return str(dest)
    if sha256 is not None:
        actual = sha256_of(dest)
        if not actual.startswith(sha256):
            raise WeightsError(f"{label}: the cached file {dest} has SHA-256 {actual}, "
                               f"expected {describe_expected(sha256)} ({url}); delete it to "
                               f"download it again")
    return str(dest)


@contextmanager
def cache_lock(dest: Path, label: str, progress: bool):
    """Hold an exclusive lock on `<dest>.lock` (POSIX `flock`, released by the system if the
    process dies; where there is no fcntl, no lock); says so when another process holds it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:                                # Windows: no lock
        yield
        return
    with open(dest.with_name(dest.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process downloading {label} to {dest}",
                      file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def renamed_into_place(tmp, dest):
    """Write `tmp` in the block; after it, `tmp` gets the usual file mode and `dest`'s name
    (`os.replace`: a reader sees the old `dest` or the whole new one); on any error, `tmp` is
    removed and `dest` untouched."""
    try:
        yield tmp
        os.chmod(tmp, usual_file_mode())     # one from mkstemp (checkpoints) is 0600
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def usual_file_mode() -> int:
    """0o666 less the process's umask: the mode `open()` would give a new file (`mkstemp` gives
    0600). Read from /proc where it shows it, so that the process-wide umask is not changed
    (briefly) while other threads may create files."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in CHUNK-sized blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: Optional[str] = None, label: Optional[str] = None,
             progress: bool = True) -> str:
    """Stream `url` into `dest`; returns the file's SHA-256 (hex).

    The bytes go to a temporary file in `dest`'s folder and are hashed on the way; the file is
    checked for completeness (bytes received == Content-Length) and against `sha256` (whole hex,
    or a prefix), then renamed to `dest` with `os.replace`, so `dest` is either absent or a
    complete, verified file, readable as any file the user creates. On a failure the temporary
    file is deleted; one left by a process killed meanwhile is overwritten by the next download
    (it has a fixed name: two downloads to one `dest` must not overlap, `fetch` holds
    `cache_lock`).

    Written here rather than taken from `torch.hub.download_url_to_file`: Python's http.client
    does not raise when the server closes the connection before Content-Length bytes arrived
    (`read(n)` just returns b''), and torch.hub's downloader does not compare the byte count
    either, so a dropped connection would leave a truncated checkpoint behind as if complete.
    """
    label = label or dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with renamed_into_place(dest.with_name(dest.name + ".part"), dest) as tmp:
        with open(tmp, "wb") as f:
            actual = _stream(url, f, dest, label, progress)
            f.flush()
            os.fsync(f.fileno())
        if sha256 is not None and not actual.startswith(sha256):
            raise WeightsError(f"{label}: the file downloaded from {url} has SHA-256 {actual}, "
                               f"expected {describe_expected(sha256)}; the file was deleted")
    return actual


def _stream(url: str, f, dest: Path, label: str, progress: bool) -> str:
    """GET `url` into the open file `f`; returns the SHA-256 of the bytes written."""
    by_hand = f"download it yourself and put it at {dest}, or pass --pretrained FILE"
    opener = urllib.request.build_opener()        # proxies from the environment, read now
    request = urllib.request.Request(url, headers={"User-Agent": "ivt"})
    try:
        response = opener.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise WeightsError(f"cannot download {label} from {url}: HTTP {e.code} {e.reason}; "
                           f"{by_hand}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        # DNS, refused connection, timeout; a malformed URL or a reply that is not HTTP
        reason = getattr(e, "reason", None) or e
        raise WeightsError(f"cannot download {label} from {url} ({reason}); {by_hand}") from None
    h, received = hashlib.sha256(), 0
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None else None
        if progress:
            print(f"downloading {label} from {url} to {dest}", file=sys.stderr)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                  disable=not progress, file=sys.stderr) as bar:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise WeightsError(f"cannot download {label} from {url}: the transfer broke "
                                       f"off after {received} bytes ({e!r}); {by_hand}") from None
                if not block:
                    break
                f.write(block)
                h.update(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise WeightsError(f"cannot download {label} from {url}: the transfer is incomplete, "
                           f"expected {total} bytes (Content-Length), received {received}; "
                           f"{by_hand}")
    return h.hexdigest()
