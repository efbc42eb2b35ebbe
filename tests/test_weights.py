"""Pretrained weights by file, name or URL (`ivt.weights`): downloads from a loopback HTTP server
started here (a swin_nano checkpoint in the Swin release's layout, a truncated transfer, a 404, a
server that never answers), the cache, pinned hashes, and the training scripts' default: the
backbone's release, resolved before any data is read or model built."""
import dataclasses
import hashlib
import http.server
import io
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_seg  # noqa: E402
from ivt import weights  # noqa: E402
from ivt.checkpoint import load_checkpoint  # noqa: E402
from ivt.data.synthetic import write_mfnet  # noqa: E402
from ivt.models import build_backbone  # noqa: E402
from ivt.tasks import load_trained  # noqa: E402
from ivt.tasks.seg import SegTask  # noqa: E402
from ivt.weights import WeightsError, cache_path, resolve_pretrained  # noqa: E402
from script_runs import tiny_seg_args  # noqa: E402
from test_detr_checkpoint import detector_extras, mmdet_swin_converter  # noqa: E402

pytestmark = pytest.mark.usefixtures("script_env")


def to_release(own: dict) -> dict:
    """Our (timm's) names -> the Swin release's: patch merging closes stage i instead of opening
    stage i+1; the release also stores the index buffers, the classifier and the final norm."""
    out = {}
    for k, v in own.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
        if k.endswith("relative_position_bias_table"):
            out[k.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
    out.update({"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256),
                "head.weight": torch.zeros(10, 256), "head.bias": torch.zeros(10)})
    return out


def saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def release():
    """(the visible weights in our names, the bytes of the release-layout file served)."""
    torch.manual_seed(0)
    bb = build_backbone("swin_nano", tuning="freeze")
    own = {k: v.clone() for k, v in bb.state_dict().items()}
    return own, saved_bytes({"model": to_release(own)})


class Server:
    """http.server on 127.0.0.1 (a free port) in a thread. Serves `files` by path;
    /truncated.pth announces 1000 bytes more than it sends, then closes the connection;
    /silent.pth never answers (until stopped); /slow.pth is /swin_nano.pth after a second;
    anything else is a 404."""

    def __init__(self, files: dict):
        self.requests = []
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path == "/silent.pth":
                    server.release.wait(30)
                    return
                if self.path == "/truncated.pth":
                    body, extra = b"0123456789" * 500, 1000
                elif self.path == "/slow.pth":                 # the release, after 1 s
                    time.sleep(1.0)
                    body, extra = files["/swin_nano.pth"], 0
                elif self.path in files:
                    body, extra = files[self.path], 0
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + extra))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Quiet(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def stop(self) -> None:
        """Nothing listens on the port afterwards: a connection is refused."""
        if self.httpd is not None:
            self.release.set()
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


@pytest.fixture
def server(release):
    s = Server({"/swin_nano.pth": release[1]})
    yield s
    s.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty download cache; no proxy between the tests and the loopback server."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("IVT_CACHE", str(folder))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return folder


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(folder: Path) -> list:
    """The files below `folder` (the cache keeps each URL under <host>/<path>), but for the
    empty lock files that let processes take turns at a download (`weights.cache_lock`)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".lock")


def check_weights(model, own):
    for k, v in own.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_download_into_the_cache_then_reuse_it_offline(release, server, cache):
    own, served = release
    path = resolve_pretrained(server.url("swin_nano.pth"), progress=False)
    assert path == str(cache / f"127.0.0.1_{server.port}" / "swin_nano.pth")
    assert Path(path).read_bytes() == served and files(cache) == [Path(path)]
    sha = hashlib.sha256(served).hexdigest()
    assert weights.download(server.url("swin_nano.pth"), cache / "again.pth",
                            progress=False) == sha
    assert server.requests == ["/swin_nano.pth"] * 2
    server.stop()                                       # no network at all from here on
    assert resolve_pretrained(server.url("swin_nano.pth")) == path
    check_weights(build_backbone("swin_nano", tuning="ivt",
                                 pretrained=server.url("swin_nano.pth")), own)


def test_urls_ending_in_the_same_file_name_are_cached_apart(release, cache):
    """Every Hugging Face file is .../resolve/main/model.safetensors: each URL has its own
    cached copy, found again offline."""
    other = release[1][:-64] + bytes(64)                          # another file, same name
    s = Server({"/a/resolve/main/model.pth": release[1], "/b/resolve/main/model.pth": other})
    try:
        first = resolve_pretrained(s.url("a/resolve/main/model.pth"), progress=False)
        second = resolve_pretrained(s.url("b/resolve/main/model.pth"), progress=False)
    finally:
        s.stop()
    assert first != second and Path(first).name == Path(second).name == "model.pth"
    assert Path(first).read_bytes() == release[1] and Path(second).read_bytes() == other
    assert resolve_pretrained(s.url("b/resolve/main/model.pth")) == second     # offline
    assert files(cache) == sorted(map(Path, (first, second)))


def test_sha256_fragment_is_checked(release, server, cache):
    sha = hashlib.sha256(release[1]).hexdigest()
    wrong = sha[:63] + ("0" if sha[63] != "0" else "1")     # all but the last digit right
    with pytest.raises(WeightsError) as e:
        resolve_pretrained(server.url(f"swin_nano.pth#sha256={wrong}"), progress=False)
    message = str(e.value)
    assert sha in message and wrong in message and server.url("swin_nano.pth") in message
    assert "deleted" in message and files(cache) == []
    path = resolve_pretrained(server.url(f"swin_nano.pth#sha256={sha}"), progress=False)
    assert Path(path).read_bytes() == release[1]
    # the cached file is checked too: a wrong hash is never accepted, a right prefix is
    with pytest.raises(WeightsError) as e:
        resolve_pretrained(server.url(f"swin_nano.pth#sha256={wrong}"))
    assert sha in str(e.value) and wrong in str(e.value) and Path(path).is_file()
    assert resolve_pretrained(server.url(f"swin_nano.pth#sha256={sha[:8].upper()}")) == path
    with pytest.raises(WeightsError, match="hex digits"):
        resolve_pretrained(server.url("swin_nano.pth#sha256=xyz"))


def test_truncated_transfer_leaves_nothing(server, cache):
    with pytest.raises(WeightsError) as e:
        resolve_pretrained(server.url("truncated.pth"), progress=False)
    assert "expected 6000 bytes" in str(e.value) and "received 5000" in str(e.value)
    assert files(cache) == []                           # no final file, no temporary file


def test_http_error_refused_connection_and_timeout(server, cache, monkeypatch):
    with pytest.raises(WeightsError) as e:
        resolve_pretrained(server.url("missing.pth"), progress=False)
    assert server.url("missing.pth") in str(e.value) and "404" in str(e.value)
    monkeypatch.setattr(weights, "TIMEOUT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        resolve_pretrained(server.url("silent.pth"), progress=False)
    assert time.perf_counter() - start < 5
    assert (server.url("silent.pth") in str(e.value)
            and str(cache_path(server.url("silent.pth"))) in str(e.value))
    server.stop()
    with pytest.raises(WeightsError) as e:
        resolve_pretrained(server.url("swin_nano.pth"), progress=False)
    message = str(e.value)
    assert (server.url("swin_nano.pth") in message
            and str(cache_path(server.url("swin_nano.pth"))) in message)
    assert "--pretrained FILE" in message and files(cache) == []


def test_release_names(release, server, cache, monkeypatch):
    own, served = release
    sha = hashlib.sha256(served).hexdigest()
    # an mmdet-style pinned prefix: the first 8 hex digits of the file's SHA-256
    monkeypatch.setitem(weights.RELEASES, "swin_t", dataclasses.replace(
        weights.RELEASES["swin_t"], url=server.url("swin_nano.pth"), sha256=sha[:8]))
    path = resolve_pretrained("swin_t", progress=False)
    assert (path == str(cache_path(server.url("swin_nano.pth")))
            and Path(path).read_bytes() == served)
    check_weights(build_backbone("swin_nano", tuning="ivt", pretrained="swin_t"), own)
    os.remove(path)
    monkeypatch.setitem(weights.RELEASES, "swin_t", dataclasses.replace(
        weights.RELEASES["swin_t"], sha256="deadbeef"))
    with pytest.raises(WeightsError, match=f"{sha}.*deadbeef.*deleted"):
        resolve_pretrained("swin_t", progress=False)
    assert files(cache) == []
    with pytest.raises(FileNotFoundError) as e:
        resolve_pretrained("swin_xl")
    assert "swin_xl" in str(e.value) and all(n in str(e.value) for n in weights.RELEASES)
    assert resolve_pretrained("none") is None and resolve_pretrained(None) is None


def test_pretrained_as_a_flag(release, server, cache, monkeypatch):
    """build_backbone(pretrained=True) loads the backbone's own release, downloaded as by name;
    False is random init with nothing fetched; True for a backbone with no release is refused."""
    own, served = release
    monkeypatch.setitem(weights.RELEASES, "swin_nano", dataclasses.replace(
        weights.RELEASES["swin_t"], url=server.url("swin_nano.pth")))
    torch.manual_seed(5)
    random_init = build_backbone("swin_nano", tuning="freeze", pretrained=False)
    assert not torch.equal(random_init.state_dict()["patch_embed.proj.weight"],
                           own["patch_embed.proj.weight"])
    assert server.requests == [] and files(cache) == []
    check_weights(build_backbone("swin_nano", tuning="ivt", pretrained=True), own)
    assert server.requests == ["/swin_nano.pth"]
    monkeypatch.delitem(weights.RELEASES, "swin_nano")
    with pytest.raises(ValueError, match="pretrained=True.*swin_nano"):
        build_backbone("swin_nano", pretrained=True)


def test_pretrained_as_a_path_object(release, tmp_path):
    """pathlib.Path works as a str does: a file loads, a missing one is FileNotFoundError."""
    own, served = release
    (tmp_path / "release.pth").write_bytes(served)
    check_weights(build_backbone("swin_nano", tuning="ivt", pretrained=tmp_path / "release.pth"),
                  own)
    with pytest.raises(FileNotFoundError, match="missing.pth: file not found"):
        build_backbone("swin_nano", pretrained=tmp_path / "missing.pth")


def test_registry_entries():
    """Every release downloads under its URL's file name; the only pinned hash is mmdet's."""
    names = {"swin_t", "swin_s", "swin_b", "swin_l", "eva02_b", "eva02_l", "dino_swin_l",
             "dinov2_b", "dinov2_l", "dinov2_b_reg", "dinov2_l_reg", "mae_b", "mae_l"}
    assert set(weights.RELEASES) == names
    assert weights.RELEASES["swin_l"].file_name == "swin_large_patch4_window12_384_22k.pth"
    assert weights.RELEASES["eva02_l"].file_name == "eva02_L_pt_m38m_p14.pt"
    dino = weights.RELEASES["dino_swin_l"]
    assert dino.sha256 == dino.file_name[-len("5486e051.pth"):-len(".pth")] == "5486e051"
    assert [n for n, r in weights.RELEASES.items() if r.sha256] == ["dino_swin_l"]
    readme = (ROOT / "README.md").read_text()
    for name, r in weights.RELEASES.items():                 # the README's table lists each
        assert f"| `{name}` | `{r.file_name}` (" in readme and r.source in readme, name


# -- through the training script -----------------------------------------------------------------
def tiny_args(data, out, iters=2, *extra):
    return tiny_seg_args(data, out, iters, *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mfnet")
    write_mfnet(root, n_train=4, n_val=2, n_test=0, size=(32, 48))
    return root


def test_train_seg_downloads_a_url_and_records_its_hash(release, server, cache, data, tmp_path,
                                                        monkeypatch):
    url = server.url("swin_nano.pth")
    out = tmp_path / "run"
    summary = train_seg.main(tiny_args(data, out, 2, "--pretrained", url))
    ckpt = load_checkpoint(summary["last"])
    assert ckpt["delta"] and ckpt["pretrained_sha256"] == hashlib.sha256(release[1]).hexdigest()
    cached = cache_path(url)
    assert ckpt["config"]["pretrained"] == str(cached)
    assert ckpt["config"]["pretrained_source"] == url
    # Evaluation uses the saved file while it is there, whatever the cache ...
    other = tmp_path / "other_cache"
    monkeypatch.setenv("IVT_CACHE", str(other))
    load_trained(summary["last"])
    assert server.requests == ["/swin_nano.pth"]
    # ... and downloads the URL again into this cache when it is not (another machine).
    os.remove(cached)
    _, model, _ = load_trained(summary["last"])
    assert server.requests == ["/swin_nano.pth"] * 2
    cached = cache_path(url)
    assert str(cached).startswith(str(other)) and cached.read_bytes() == release[1]
    check_weights(model.backbone, release[0])
    # Resuming without --pretrained uses the run's own weights (from the cache: no network).
    server.stop()
    summary = train_seg.main(tiny_args(data, out, 4, "--resume", "--allow-changes"))
    assert summary["iters"] == 4
    # Neither the saved file nor a cached copy, and no network: the error names the URL.
    os.remove(cached)
    with pytest.raises(WeightsError) as e:
        load_trained(summary["last"])
    assert url in str(e.value) and str(cached) in str(e.value)


def test_the_main_job_offline_stops_before_data_and_model(cache, tmp_path, capsys, monkeypatch):
    """`python train_seg.py --backbone swin_l --data mfnet/` on a machine without network."""
    url = f"http://127.0.0.1:{closed_port()}/swin_large_patch4_window12_384_22k.pth"
    monkeypatch.setitem(weights.RELEASES, "swin_l",
                        dataclasses.replace(weights.RELEASES["swin_l"], url=url))

    def untouched(*args, **kwargs):
        raise AssertionError("the datasets or the model were touched")
    monkeypatch.setattr(SegTask, "build_model", untouched)
    monkeypatch.setattr(SegTask, "build_datasets", untouched)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mfnet").mkdir()                  # there, but never read
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        train_seg.main(["--backbone", "swin_l", "--data", str(tmp_path / "mfnet")])
    assert e.value.code == 2 and time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot download swin_l from " + url)
    assert str(cache_path(url)) in err[0]
    assert not (tmp_path / "runs").exists()


def test_random_frozen_backbone_warns(data, tmp_path, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise ValueError("stop here")
    monkeypatch.setattr(SegTask, "build_model", stop)
    warning = "the frozen backbone stays random"
    for backbone, extra in (("swin_l", ["--pretrained", "none"]), ("swin_nano", [])):
        args = tiny_args(data, tmp_path / backbone, 2, *extra)
        args[args.index("swin_nano")] = backbone
        with pytest.raises(SystemExit):
            train_seg.main(args)
        err = capsys.readouterr().err
        assert warning in err and "mean nothing for the paper" in err, err
    args = tiny_args(data, tmp_path / "full", 2, "--tuning", "full")
    del args[args.index("--d2"):args.index("--d2") + 2]       # refused with --tuning full
    with pytest.raises(SystemExit):
        train_seg.main(args)
    err = capsys.readouterr().err
    assert "error: stop here" in err and warning not in err, err     # reached the model


def test_mmdet_detector_checkpoint_through_the_pretrained_path(release, cache, tmp_path,
                                                               monkeypatch):
    """A whole mmdet DINO checkpoint (backbone in mmdet's names) loads as `pretrained`, by file
    and by release name; what it sets aside (the detector's parts, the output norms) is named
    in a warning."""
    own, served = release
    release_sd = torch.load(io.BytesIO(served), weights_only=True)["model"]
    sd = mmdet_swin_converter({k: v for k, v in release_sd.items()
                               if not k.startswith(("head.", "norm."))})
    sd.update(detector_extras([32, 64, 128, 256]))
    body = saved_bytes({"meta": {"mmdet_version": "3.3.0"}, "state_dict": sd})
    (tmp_path / "dino.pth").write_bytes(body)
    with pytest.warns(UserWarning, match=r"2 keys of the detector's own parts not loaded: "
                      r"bbox_head\.\* \(1\), neck\.\* \(1\)"):
        with pytest.warns(UserWarning, match=r"per-output norms are not loaded.*norm0\.bias"):
            model = build_backbone("swin_nano", tuning="ivt", pretrained=str(tmp_path / "dino.pth"))
    check_weights(model, own)
    detrex = {"backbone." + k: v for k, v in release_sd.items()}     # release names, {'model'}
    detrex.update(detector_extras([32, 64, 128, 256]))
    torch.save({"model": detrex, "iteration": 90000}, tmp_path / "detrex.pth")
    with pytest.warns(UserWarning, match="own parts"), \
            pytest.warns(UserWarning, match="output norms"):
        model = build_backbone("swin_nano", tuning="ivt", pretrained=str(tmp_path / "detrex.pth"))
    check_weights(model, own)
    server = Server({"/dino-5scale_swin-l_8xb2-36e_coco-5486e051.pth": body})
    try:
        name = "dino-5scale_swin-l_8xb2-36e_coco-5486e051.pth"
        monkeypatch.setitem(weights.RELEASES, "dino_swin_l", dataclasses.replace(
            weights.RELEASES["dino_swin_l"], url=server.url(name),
            sha256=hashlib.sha256(body).hexdigest()[:8]))
        with pytest.warns(UserWarning, match="own parts"), \
                pytest.warns(UserWarning, match="output norms"):
            model = build_backbone("swin_nano", tuning="full", pretrained="dino_swin_l")
        check_weights(model, own)
    finally:
        server.stop()


def test_processes_fetching_one_file_take_turns(release, server, cache):
    """The ranks of a torchrun job resolve --pretrained together: one downloads, the others wait
    for it and find the file (each downloaded it whole, N times the traffic and the disk)."""
    url = server.url("slow.pth")
    got = []
    threads = [threading.Thread(target=lambda: got.append(resolve_pretrained(url, False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == [str(cache_path(url))] * 3
    assert server.requests.count("/slow.pth") == 1
    assert files(cache) == [cache_path(url)]


def test_a_killed_downloads_part_file_is_replaced_and_the_file_readable(release, server, cache):
    """A process killed mid-download (SIGTERM from torchrun, SIGKILL) cannot delete its partial
    file: the next download of the same file overwrites it instead of adding another. The cached
    file gets the mode any file the user creates gets (mkstemp's 0600 kept other users of a
    shared $IVT_CACHE out)."""
    url = server.url("swin_nano.pth")
    dest = cache_path(url)
    dest.parent.mkdir(parents=True)
    dest.with_name(dest.name + ".part").write_bytes(b"from a process killed mid-download")
    resolve_pretrained(url, progress=False)
    assert files(cache) == [dest] and dest.read_bytes() == release[1]
    umask = os.umask(0o022)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask


def test_malformed_urls_and_replies_are_weights_errors(server, cache):
    """What http.client raises outside OSError (a bad port, a reply that is not HTTP) is reported
    like any failed download (it was a bare traceback); an encoded slash cannot lead the cached
    copy out of the cache."""
    with pytest.raises(WeightsError, match="cannot download f.pth from http://127.0.0.1:8o80"):
        resolve_pretrained("http://127.0.0.1:8o80/f.pth", progress=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def not_http():
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH_8.9\r\n")
        threading.Thread(target=not_http, daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/f.pth"
        with pytest.raises(WeightsError, match="BadStatusLine|SSH-2.0"):
            resolve_pretrained(url, progress=False)
    for url in ("https://h/a%2F..%2F..%2F..%2Fescaped/f.pth", "https://h/a%5C..%5Cx/f.pth"):
        with pytest.raises(WeightsError, match="encoded slash"):
            cache_path(url)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    from safetensors.torch import save_file
    from ivt.models.backbone import CheckpointError, read_state_dict
    path = tmp_path / "visible.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read pretrained checkpoint {path}"):
        read_state_dict(str(path))


def test_url_forms_and_their_cached_paths():
    """What `cache_path` promises, written out by hand for each URL form: the host (':' made
    '_') and the percent-decoded folders and file name, the query and fragment ignored; a
    literal '.' or '..' folder is refused (the cached copy must stay in the cache, as for an
    encoded slash); a pinned hash is 8 to 64 hex digits, so a shorter prefix is an error."""
    url = "https://h.example:8443/a%20b/resolve/main/x%20y.pth?download=true#frag"
    assert weights.url_file_name(url) == "x y.pth"
    assert cache_path(url) == weights.cache_dir() / "h.example_8443" / "a b" / "resolve" / \
        "main" / "x y.pth"
    for url in ("https://h/a/../../../escaped/f.pth", "https://h/./f.pth"):
        with pytest.raises(WeightsError, match="no '.', '..'"):
            cache_path(url)
    pinned = weights.split_sha256("https://h/f.pth#sha256=0123ABCD")
    assert pinned == ("https://h/f.pth", "0123abcd")
    for short in ("0123abc", "a"):
        with pytest.raises(WeightsError, match="8 to 64 hex digits"):
            weights.split_sha256(f"https://h/f.pth#sha256={short}")


def test_hand_placed_https_file_and_relative_paths_need_no_network(release, cache, tmp_path,
                                                                   monkeypatch):
    """An https URL (every release is one) whose file was put at its cache path by hand is
    used from there without any request (the host does not exist); a local file given by a
    relative path is returned absolute, so that a run resumes from any working directory."""
    url = "https://no-such-host.invalid/models/swin_nano.pth"
    dest = cache_path(url)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(release[1])
    assert resolve_pretrained(url, progress=False) == str(dest)
    monkeypatch.chdir(tmp_path)
    Path("rel.pth").write_bytes(release[1])
    got = resolve_pretrained("rel.pth", progress=False)
    assert os.path.isabs(got) and got == str(tmp_path / "rel.pth")


def test_a_saved_run_finds_its_release_by_name_in_the_cache(release, cache, tmp_path,
                                                            monkeypatch):
    """A run trained with `--pretrained swin_t` records the file and the name: on a machine
    where that file is not, the name is resolved again (here: the release's file already in
    this cache, so no network); while the saved file exists it is used as it is."""
    url = "https://no-such-host.invalid/storage/swin_tiny_patch4_window7_224.pth"
    monkeypatch.setitem(weights.RELEASES, "swin_t",
                        dataclasses.replace(weights.RELEASES["swin_t"], url=url))
    dest = cache_path(url)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(release[1])
    elsewhere = {"pretrained": str(tmp_path / "gone" / "swin_tiny.pth"),
                 "pretrained_source": "swin_t"}
    assert weights.saved_pretrained(elsewhere, progress=False) == str(dest)
    here = tmp_path / "swin_tiny.pth"
    here.write_bytes(release[1])
    assert weights.saved_pretrained({"pretrained": str(here), "pretrained_source": "swin_t"},
                                    progress=False) == str(here)
