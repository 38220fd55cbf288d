"""Every backend that runs here: the batch contract, exact-once over ranks, determinism,
resume from a cursor, and eval fidelity against torchvision's reference preprocessing."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from datasvc.loaders import create_loader, list_loaders
from datasvc.packs import open_pack

BACKENDS = ["custom", "torch", "dali_cpu"]


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except ImportError:
        return False


def backend_param(name):
    marks = [pytest.mark.dali] if name.startswith("dali") else []
    if name.startswith("dali") and not _has_dali():
        marks.append(pytest.mark.skip(reason="NVIDIA DALI is not installed"))
    return pytest.param(name, marks=marks)


ALL = [backend_param(b) for b in BACKENDS]


def make(backend, pack, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("image_size", 64)
    kw.setdefault("num_workers", 1)
    return create_loader(backend, pack, **kw)


def collect(loader, limit=None):
    """Batches of one pass (or its first ``limit``; none beyond is fetched)."""
    with loader:
        return list(itertools.islice(loader, limit))


def test_registry():
    assert {"custom", "torch", "dali_cpu", "dali_gpu"} <= set(list_loaders())
    with pytest.raises(KeyError, match="valid: .*custom"):
        create_loader("nope", "x")


@pytest.mark.parametrize("backend", ALL)
def test_batch_contract(backend, clean_pack):
    pack = open_pack(clean_pack)
    loader = make(backend, clean_pack)
    batches = collect(loader)
    assert len(batches) == len(loader) == 64 // 8
    split = pack.split("train")
    for b in batches:
        assert b.images.dtype == torch.uint8 and tuple(b.images.shape) == (8, 3, 64, 64)
        # the Batch docstring: channels-last memory, NCHW shape; .contiguous() is plain NCHW
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert not b.images.is_contiguous() and b.images.contiguous().is_contiguous()
        assert b.labels.dtype == torch.int64 and b.ids.dtype == torch.int64
        for label, sid in zip(b.labels.tolist(), b.ids.tolist()):
            assert split[sid].label == label
        assert b.images.float().std() > 5  # real pixels, not zeros


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_exact_once_over_ranks(backend, world, train, clean_pack):
    split = "train" if train else "val"
    n = len(open_pack(clean_pack).split(split))
    ids, per_rank = [], []
    for r in range(world):
        loader = make(
            backend, clean_pack, split=split, train=train, rank=r, world_size=world, batch_size=5
        )
        loader.set_epoch(2)
        got = [b.ids for b in collect(loader)]
        per_rank.append(len(got))
        ids += [x for t in got for x in t.tolist()]
    assert len(set(ids)) == len(ids), "a sample was delivered twice"
    if train:
        assert len(set(per_rank)) == 1 and n - len(ids) < 5 * world
    else:
        assert sorted(ids) == list(range(n))


@pytest.mark.parametrize("backend", ALL)
def test_same_seed_same_ids(backend, clean_pack):
    a = [b.ids for b in collect(make(backend, clean_pack, seed=7))]
    b = [b.ids for b in collect(make(backend, clean_pack, seed=7))]
    c = [b.ids for b in collect(make(backend, clean_pack, seed=8))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def _pixels_by_id(loader) -> dict[int, torch.Tensor]:
    return {int(i): img.clone() for b in collect(loader) for i, img in zip(b.ids, b.images)}


@pytest.fixture(scope="module")
def served_pack(clean_pack):
    from datasvc.service.local import LocalServer

    with LocalServer([clean_pack], workers=1) as server:
        yield server


@pytest.mark.parametrize("backend", [*ALL, "remote"])
def test_augmentation_is_a_pure_function_of_seed_epoch_id(backend, clean_pack, request):
    """The README's claim, for every backend: a sample's pixels depend on (seed, epoch, id)
    only, not on the batch it lands in, the rank and world size, the workers, or a resume;
    another epoch draws other crops."""
    source, kw = clean_pack, {}
    if backend == "remote":
        server = request.getfixturevalue("served_pack")
        source, kw = server.endpoint, {"pack": server.pack_name}

    def loader(epoch=0, **options):
        options = {"image_size": 64, "num_workers": 1, "seed": 5, **kw, **options}
        out = create_loader(backend, source, **options)
        out.set_epoch(epoch)
        return out

    alone = _pixels_by_id(loader(batch_size=8))
    shared = {}
    for rank in (0, 1):
        shared |= _pixels_by_id(loader(batch_size=4, rank=rank, world_size=2, num_workers=2))
    first = loader(batch_size=4, rank=1, world_size=2)
    with first:
        list(itertools.islice(first, 2))  # two batches delivered, then a "crash"
        state = first.state_dict()
    resumed = loader(batch_size=4, rank=1, world_size=2)
    resumed.load_state_dict(state)
    after_resume = _pixels_by_id(resumed)
    assert len(shared) >= 56 and len(after_resume) == 4 * (len(shared) // 8 - 2)
    for got in (shared, after_resume):
        for i, img in got.items():
            assert torch.equal(img, alone[i]), f"sample {i} differs"
    later = _pixels_by_id(loader(epoch=1, batch_size=8))
    changed = sum(not torch.equal(later[i], alone[i]) for i in set(later) & set(alone))
    assert changed > 0.9 * len(set(later) & set(alone))


def test_custom_pixels_are_a_function_of_seed_epoch_id(clean_pack):
    """Same pixels whatever the engine, the number of workers or where the epoch resumed."""
    a = collect(make("custom", clean_pack, seed=3, num_workers=1))
    b = collect(make("custom", clean_pack, seed=3, num_workers=2, prefetch_factor=3))
    c = collect(make("custom", clean_pack, seed=3, num_workers=2, engine="thread"))
    assert len(a) == len(b) == len(c) > 0
    for x, y, z in zip(a, b, c):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.images, y.images)
        assert torch.equal(x.ids, z.ids) and torch.equal(x.images, z.images)
    loader = make("custom", clean_pack, seed=3, num_workers=2)
    loader.set_epoch(1)
    other = collect(loader)
    assert not torch.equal(other[0].images, a[0].images)


def test_custom_lends_slots_without_copies(clean_pack):
    """A consumer that drops each batch gets the shared slots themselves (no copy) with the
    pixels of a copying run; one that keeps every batch gets them all intact (no slot that it
    still holds is written again)."""
    ref0 = collect(make("custom", clean_pack, seed=2, num_workers=1, engine="thread"))
    later = make("custom", clean_pack, seed=2, num_workers=1, engine="thread")
    later.set_epoch(1)
    ref1 = collect(later)
    loader = make("custom", clean_pack, seed=2, num_workers=1, prefetch_factor=3)
    lent = 0
    with loader:
        for k, b in enumerate(loader):  # epoch 0, streaming
            lent += b.images.data_ptr() in {t.data_ptr() for t in loader._slot_images}
            assert torch.equal(b.images, ref0[k].images), k
        kept = list(loader)  # epoch 1, every batch held at once
    assert lent == len(ref0) > 0
    assert len(kept) == len(ref1)
    for x, y in zip(kept, ref1):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.images, y.images)


@pytest.mark.parametrize("backend", ALL)
def test_resume_mid_epoch(backend, clean_pack):
    full = collect(make(backend, clean_pack, seed=1))
    first = make(backend, clean_pack, seed=1)
    head = collect(first, limit=3)
    state = first.state_dict()
    assert state["sampler"]["batches_done"] == 3
    second = make(backend, clean_pack, seed=1)
    second.load_state_dict(state)
    tail = collect(second)
    assert len(head) + len(tail) == len(full)
    for x, y in zip(head + tail, full):
        assert torch.equal(x.ids, y.ids)
        if backend == "custom":
            assert torch.equal(x.images, y.images)


def test_epochs_advance_without_set_epoch(clean_pack):
    loader = make("custom", clean_pack)
    with loader:
        e0 = [b.ids for b in loader]
        e1 = [b.ids for b in loader]
        assert loader.epoch == 1
    assert not torch.equal(torch.cat(e0), torch.cat(e1))


def _reference_eval(data: bytes, size: int) -> np.ndarray:
    from PIL import Image
    from torchvision import transforms

    t = transforms.Compose(
        [transforms.Resize(int(round(size * 256 / 224))), transforms.CenterCrop(size)]
    )
    return np.asarray(t(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("backend", ALL)
def test_eval_fidelity_against_torchvision(backend, lmdb_pack):
    """Mean absolute difference under 2 levels against PIL Resize(256) + CenterCrop(224)."""
    split = open_pack(lmdb_pack).split("val")
    loader = make(backend, lmdb_pack, split="val", train=False, image_size=224, batch_size=4)
    diffs = []
    for b in collect(loader):
        for img, sid in zip(b.images, b.ids.tolist()):
            ref = _reference_eval(split[sid].image, 224)
            ours = img.permute(1, 2, 0).cpu().numpy()
            diffs.append(np.abs(ours.astype(float) - ref.astype(float)).mean())
    assert len(diffs) == len(split)
    assert np.mean(diffs) < 2.0, f"mean abs diff {np.mean(diffs):.2f}"


def test_crop_aware_decode_matches_full_decode(lmdb_pack):
    """The crop-aware path gives the pixels of full decode → crop → resize, nearly."""
    import cv2
    import simplejpeg

    from datasvc.augment import TransformConfig, train_crop
    from datasvc.decode import CROP_DECODER, decode_train

    cfg = TransformConfig(train=True, image_size=96)
    split = open_pack(lmdb_pack).split("train")
    diffs = []
    for sid in range(0, len(split), 3):
        s = split[sid]
        crop = train_crop(cfg, 0, 0, sid, s.height, s.width)
        out = np.empty((96, 96, 3), np.uint8)
        decode_train(s.image, crop, s.height, s.width, out, CROP_DECODER)
        full = simplejpeg.decode_jpeg(s.image)
        region = full[crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]
        ref = cv2.resize(region, (96, 96), interpolation=cv2.INTER_AREA)
        if crop.flip:
            ref = ref[:, ::-1]
        diffs.append(np.abs(out.astype(float) - ref.astype(float)).mean())
    assert np.mean(diffs) < 3.0, f"{CROP_DECODER}: mean abs diff {np.mean(diffs):.2f}"


def test_dali_gpu_without_gpu_fails_clearly(clean_pack):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the no-GPU error path cannot be exercised")
    with pytest.raises((RuntimeError, ImportError), match="GPU|DALI"):
        make("dali_gpu", clean_pack)


@pytest.mark.gpu
@pytest.mark.dali
def test_dali_gpu_batches(clean_pack):
    loader = make("dali_gpu", clean_pack)
    batches = collect(loader)
    assert batches[0].images.is_cuda and batches[0].images.dtype == torch.uint8
    cpu = collect(make("dali_cpu", clean_pack))
    for g, c in zip(batches, cpu):
        assert torch.equal(g.ids, c.ids)
        diff = (g.images.cpu().float() - c.images.float()).abs().mean()
        assert diff < 4, "the GPU twin should give nearly the pixels of the CPU pipeline"


def test_custom_workers_exit_on_close(clean_pack):
    import psutil

    loader = make("custom", clean_pack, num_workers=2)
    next(iter(loader))
    pids = loader.worker_pids()
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    loader.close()
    for p in pids:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE


def test_unknown_option_is_refused_and_trainer_offers_only_named_ones(clean_pack):
    """Backends take the shared options as ``**common``; anything else is a TypeError, so the
    trainer passes GPU options (``device_id``, ``pin_memory``) only where a backend names them."""
    from trainer.data import _accepts

    with pytest.raises(TypeError):
        make("custom", clean_pack, device_id=0)
    assert _accepts("custom", "pin_memory") and not _accepts("custom", "device_id")
    assert _accepts("dali_gpu", "device_id") and not _accepts("dali_gpu", "pin_memory")
    assert _accepts("remote", "device_id") and _accepts("torch", "pin_memory")


def test_torch_style_names_and_their_deprecated_forms(clean_pack):
    """``num_workers``/``prefetch_factor`` mean what torch's DataLoader means (slots in flight =
    prefetch_factor × num_workers); the old ``workers``/``prefetch`` still work for one release
    with a DeprecationWarning, and giving both names of one option is an error."""
    loader = make("custom", clean_pack, num_workers=2, prefetch_factor=3)
    assert (loader.num_workers, loader.prefetch_factor, loader.slots) == (2, 3, 6)
    kw = {"batch_size": 8, "image_size": 64}
    with pytest.warns(DeprecationWarning, match="workers= is deprecated.*use num_workers="):
        old = create_loader("custom", clean_pack, workers=2, **kw)
    assert old.num_workers == 2
    with pytest.warns(DeprecationWarning, match="prefetch= is deprecated"):
        old = create_loader("custom", clean_pack, num_workers=2, prefetch=5, **kw)
    assert old.slots == 5, "the old prefetch counted batches in flight in all"
    with pytest.warns(DeprecationWarning):
        torch_old = create_loader("torch", clean_pack, workers=0, **kw)
    assert torch_old.num_workers == 0 and len(collect(torch_old, 1)) == 1
    with pytest.raises(TypeError, match="give num_workers= only"):
        create_loader("custom", clean_pack, workers=1, num_workers=1, **kw)


def test_mode_options_are_checked_against_their_literal_types(clean_pack):
    from datasvc.loaders.custom import ENGINES
    from datasvc.loaders.remote import DECODE_MODES
    from datasvc.service.protocol import OPS

    assert ENGINES == ("process", "thread") and "server" in DECODE_MODES and "ping" in OPS
    with pytest.raises(ValueError, match="engine must be one of"):
        make("custom", clean_pack, engine="fiber")


def test_torch_tensor_decode_matches_pil_decode(clean_pack):
    """decode='tensor' (torchvision.io) gives the same ids and labels as PIL decode, and the
    same pictures up to the two decoders' and resizers' rounding (eval: no randomness)."""
    pil = collect(make("torch", clean_pack, split="val", train=False))
    ten = collect(make("torch", clean_pack, split="val", train=False, decode="tensor"))
    assert len(pil) == len(ten) > 0
    for a, b in zip(pil, ten):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
        assert a.images.shape == b.images.shape and b.images.dtype == torch.uint8
        diff = (a.images.float() - b.images.float()).abs().mean().item()
        assert diff < 4.0, diff
    train = collect(make("torch", clean_pack, decode="tensor"), limit=2)
    assert tuple(train[0].images.shape) == (8, 3, 64, 64)
    with pytest.raises(ValueError, match="tensor"):
        make("torch", clean_pack, decode="gpu")
