"""`ShapeCache` (ivt/models/shape_cache.py): what the backbones keep per input shape (Swin's
attention bias and shift masks, the ViTs' rotary tables). Entries used with grad on are kept
(training's shapes; a CUDA graph reads them by address), entries used only without grad are
bounded, so that inference at every image's own size does not grow memory without end; a
cached bias follows the weights loaded into the table."""
import pytest
import torch

from ivt.models import build_backbone
from ivt.models.shape_cache import ShapeCache
from ivt.models.swin import SwinBlock, WindowAttention


def test_kept_with_grad_bounded_without():
    cache, made = ShapeCache(inference_entries=2), []

    def get(key, stamp=None):
        return cache.get(key, lambda: made.append(key) or object(), stamp)

    train = get("train")                                   # grad is on by default
    with torch.no_grad():
        first = [get(k) for k in ("a", "b")]
        assert get("a") is first[0] and made == ["train", "a", "b"]
        get("c")                                           # evicts "b", the least recent
        assert sorted(cache.recent) == ["a", "c"] and len(cache) == 3
        assert get("b") is not first[1] and made[-1] == "b"
        assert get("train") is train                       # kept, also used without grad
        assert "train" in cache.kept and len(cache.recent) == 2
    assert get("train", stamp=1) is not train             # a new stamp makes it again
    assert get("train", stamp=1) is cache.kept["train"][1]


def test_kept_entry_remade_without_grad_stays_kept():
    """An entry once used with grad on stays kept for the module's life: when new weights (a new
    stamp) make it again without grad, the new value replaces it among the kept entries (not
    the bounded recent ones, and no stale copy is left), and inference at other shapes does not
    evict it."""
    cache = ShapeCache(inference_entries=1)
    cache.get("train", lambda: "old", stamp=0)             # grad on: kept
    with torch.no_grad():
        assert cache.get("train", lambda: "new", stamp=1) == "new"
        assert cache.kept == {"train": (1, "new")} and len(cache) == 1
        for key in ("a", "b", "c"):
            cache.get(key, object)
        assert cache.get("train", lambda: "again", stamp=1) == "new"
    assert len(cache) == 2


def caches(model):
    for m in model.modules():
        if isinstance(m, WindowAttention):
            yield m._bias
        elif isinstance(m, SwinBlock):
            yield m._masks


def test_swin_inference_at_many_sizes_is_bounded_and_exact():
    torch.manual_seed(0)
    model = build_backbone("swin_nano", tuning="ivt")
    vis, ir = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64)
    sum(o.sum() for o in model(vis, ir)).backward()        # a training step's forward: kept
    kept = [{k: v[1] for k, v in c.kept.items()} for c in caches(model)]
    assert sum(map(len, kept)) > 0
    model.eval()
    sizes = [(64 + 32 * i, 96 + 16 * i) for i in range(6)]
    with torch.no_grad():
        outs = [model(torch.randn(1, 3, *s), torch.randn(1, 1, *s)) for s in sizes]
        for c, before in zip(caches(model), kept):
            assert len(c.recent) <= 2
            assert all(c.kept[k][1] is t for k, t in before.items())   # same tensors, same address
        x = torch.randn(1, 3, *sizes[0]), torch.randn(1, 1, *sizes[0])
        again = model(*x)                                  # its bias evicted, made again
        fresh = build_backbone("swin_nano", tuning="ivt")
        fresh.load_state_dict(model.state_dict())
        fresh = fresh.eval()(*x)
    assert len(outs) == 6
    for a, b in zip(again, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cached_bias_follows_loaded_weights():
    torch.manual_seed(0)
    model = build_backbone("swin_nano", tuning="ivt").eval()
    x = torch.randn(1, 3, 64, 64), torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        model(*x)                                         # caches the bias of these weights
        state = {k: v + 0.5 if "relative_position_bias_table" in k else v
                 for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        fresh = build_backbone("swin_nano", tuning="ivt").eval()
        fresh.load_state_dict(state)
        for a, b in zip(model(*x), fresh(*x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["eva02_b"])
def test_rope_tables_bounded_without_grad(name):
    with torch.device("meta"):
        model = build_backbone(name, tuning="ivt", img_size=64)
    meta = torch.device("meta")
    train = model.rope_tables((4, 4), meta)
    with torch.no_grad():
        for n in range(5, 12):
            model.rope_tables((n, n + 1), meta)
        assert len(model._rope.recent) == 2 and model.rope_tables((4, 4), meta) is train


def test_cached_shift_mask_bias_follows_the_batch():
    """The cached attention bias of shifted windows is (B*nW, heads, N, N) for one batch size:
    inference on one image, then on a batch of two, gives each image the result it has alone."""
    torch.manual_seed(0)
    model = build_backbone("swin_nano", "ivt", d2=16).eval()
    vis, ir = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        alone = model(vis[:1], ir[:1])
        together = model(vis, ir)
        second = model(vis[1:], ir[1:])
    for a, b, c in zip(alone, together, second):
        torch.testing.assert_close(b[:1], a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b[1:], c, rtol=1e-5, atol=1e-5)


def test_entries_are_kept_per_device():
    """The same shape on another device makes its own entries: a Swin model run on the CPU, then
    moved to the meta device, runs there (a CPU mask or bias used with meta tensors would fail),
    and the rotary tables asked for on the CPU and on meta lie on the device asked for."""
    torch.manual_seed(0)
    model = build_backbone("swin_nano", tuning="ivt").eval()
    x = torch.randn(1, 3, 64, 64), torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        model(*x)
        assert any(len(c) for c in caches(model))
        model.to("meta")
        outs = model(*(t.to("meta") for t in x))
    assert all(o.device.type == "meta" for o in outs)

    vit = build_backbone("eva02_b", tuning="ivt", img_size=64)
    on_cpu = vit.rope_tables((4, 4), torch.device("cpu"))
    on_meta = vit.rope_tables((4, 4), torch.device("meta"))
    assert [t.device.type for t in on_cpu] == ["cpu", "cpu"]
    assert [t.device.type for t in on_meta] == ["meta", "meta"]
