"""Training data: the synthetic task is deterministic and needs layout, ImageFolder skips what it
cannot read, and the loader's order depends only on (seed, step)."""
import os
import warnings

import numpy as np
import pytest
import torch

from supernet.data import (DataConfig, DataError, ImageFolder, StepBatchSampler, SyntheticShapes, build_datasets,
                           heldout_batches, make_loader, scan_image_folder, synthetic_classes)
from supernet.errors import VitslimError


def test_synthetic_is_a_function_of_seed_split_and_index():
    a, b = SyntheticShapes(10, 32, length=50, seed=3), SyntheticShapes(10, 32, length=50, seed=3)
    for i in (0, 7, 49):
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and ya == yb
    assert not torch.equal(a[5][0], SyntheticShapes(10, 32, length=50, seed=4)[5][0])
    assert not torch.equal(a[5][0], SyntheticShapes(10, 32, length=50, seed=3, split="heldout")[5][0])
    assert a[5][0].shape == (3, 32, 32) and a[5][0].dtype == torch.float32


def test_synthetic_labels_are_balanced_and_classes_need_order_and_orientation():
    ds = SyntheticShapes(12, 32, length=120)
    counts = np.bincount([ds[i][1] for i in range(120)], minlength=12)
    assert (counts == 10).all()
    classes = synthetic_classes(12)
    for a, b, lay in classes:  # every class has a twin with the same two shapes: shapes alone never decide
        assert any(c != (a, b, lay) and {c[0], c[1]} == {a, b} for c in classes)


def test_synthetic_class_is_not_its_colour():
    ds = SyntheticShapes(4, 32, length=400, distractors=0)
    means = np.stack([np.stack([ds.render(i).mean((0, 1)) for i in range(k, 400, 4)]).mean(0) for k in range(4)])
    assert np.abs(means - means.mean(0)).max() < 0.05  # per-class mean colours agree


def test_synthetic_rejects_unsupported_class_count():
    with pytest.raises(DataError, match="num_classes: got 1000"):
        SyntheticShapes(1000, 32)


def _write_folder(root, n_per_class=3, corrupt=0, size=(40, 30)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for k in range(n_per_class):
            arr = (rng.uniform(0, 255, (size[1], size[0], 3))).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(root, c, f"{k}.png"))
    for k in range(corrupt):
        with open(os.path.join(root, "cat", f"bad{k}.jpg"), "wb") as f:
            f.write(b"not a jpeg at all" * 3)


def test_image_folder_skips_unreadable_files_with_a_warning_and_count(tmp_path):
    _write_folder(tmp_path, n_per_class=2, corrupt=2)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image file"):
        ds = ImageFolder(str(tmp_path), image_size=24)
    assert len(ds) == 4 and ds.classes == ["cat", "dog"] and ds.skipped == 2
    x, y = ds[1]
    assert x.shape == (3, 24, 24) and y in (0, 1)
    assert torch.equal(ds[1][0], ds[1][0])  # the crop is drawn from (seed, epoch, index)
    assert not torch.equal(ds[1][0], ds[1 + len(ds)][0])  # the next epoch crops differently


def test_image_folder_fails_when_nothing_readable_remains(tmp_path):
    os.makedirs(tmp_path / "a")
    with open(tmp_path / "a" / "x.png", "wb") as f:
        f.write(b"\x89PNG garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="all 1 image files are unreadable"):
            scan_image_folder(str(tmp_path))


@pytest.mark.parametrize("layout,needle", [("empty", "no class sub-directories"), ("noimages", "no image files"),
                                           ("missing", "no such directory")])
def test_image_folder_without_images_is_an_error(tmp_path, layout, needle):
    root = tmp_path / "data"
    if layout != "missing":
        os.makedirs(root)
    if layout == "noimages":
        os.makedirs(root / "a")
        (root / "a" / "readme.txt").write_text("hi")
    with pytest.raises(VitslimError, match=needle):
        scan_image_folder(str(root))


def test_junk_of_other_systems_is_neither_a_class_nor_an_image(tmp_path):
    _write_folder(tmp_path, n_per_class=2)
    for junk in ("__MACOSX/cat/._0.png", "cat/._1.png", ".ipynb_checkpoints/x.png", "dog/.hidden/y.png"):
        os.makedirs(os.path.dirname(tmp_path / junk), exist_ok=True)
        (tmp_path / junk).write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # unreadable as an image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: the junk is not looked at
        classes, samples, skipped = scan_image_folder(str(tmp_path))
    assert classes == ["cat", "dog"] and skipped == 0 and len(samples) == 4


def test_a_class_directory_without_readable_images_is_named(tmp_path):
    """Every sub-directory is a class: an empty one would shift the labels of those after it."""
    _write_folder(tmp_path, n_per_class=2)
    os.makedirs(tmp_path / "ant")
    (tmp_path / "ant" / "notes.txt").write_text("todo")
    with pytest.raises(DataError, match=r"1 class directory has no readable image \(ant\)"):
        scan_image_folder(str(tmp_path))
    (tmp_path / "ant" / "broken.jpg").write_bytes(b"not a jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"\(ant\), expected images in every sub-directory"):
            scan_image_folder(str(tmp_path))


def test_deep_greyscale_images_keep_their_brightness(tmp_path):
    """PIL's convert() clips 16-bit greyscale at 255 (nearly all white): rescaled from the bit depth instead."""
    from PIL import Image
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    for c in ("a", "b"):
        os.makedirs(tmp_path / c)
        Image.fromarray(ramp).save(tmp_path / c / "deep.png")
    assert Image.open(tmp_path / "a" / "deep.png").mode.startswith("I")
    for chans in (1, 3):
        ds = ImageFolder(str(tmp_path), image_size=32, train=False, crop_pct=1.0, in_chans=chans, mean=(0,) * chans,
                         std=(1,) * chans)
        x = ds[0][0]
        assert x.shape == (chans, 32, 32) and abs(float(x.mean()) - 0.5) < 0.01 and float(x.min()) < 0.01


def test_an_image_over_the_pixel_limit_is_skipped_when_read(tmp_path, monkeypatch):
    """With verify off (the ImageNet config) a decompression bomb is met only when read: skipped like any
    undecodable file, not a crash."""
    from PIL import Image
    _write_folder(tmp_path, n_per_class=2)
    Image.new("L", (300, 300)).save(tmp_path / "cat" / "0huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)  # over twice the limit: an error, not a warning
    ds = ImageFolder(str(tmp_path), image_size=16, verify=False)
    i = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("0huge.png"))
    with pytest.warns(UserWarning, match="0huge.png: could not be decoded"):
        x, y = ds[i]
    assert x.shape == (3, 16, 16) and ds.decode_failures == 1


def test_image_folder_eval_transform_and_heldout_fraction(tmp_path):
    _write_folder(tmp_path, n_per_class=5)
    cfg = DataConfig.from_dict({"type": "imagefolder", "train_dir": str(tmp_path), "val_fraction": 0.2})
    tr, ho = build_datasets(cfg, image_size=16, num_classes=2, seed=1)
    assert len(tr) == 8 and len(ho) == 2 and not set(tr.samples) & set(ho.samples)
    tr2, ho2 = build_datasets(cfg, image_size=16, num_classes=2, seed=1)
    assert ho2.samples == ho.samples
    assert not ho.train and torch.equal(ho[0][0], ho[0][0]) and ho[0][0].shape == (3, 16, 16)
    with pytest.raises(DataError, match="has 2 classes, expected 5"):
        build_datasets(cfg, image_size=16, num_classes=5)


def test_batch_order_depends_only_on_seed_and_step():
    full = list(StepBatchSampler(25, 8, steps=10, seed=5))
    resumed = list(StepBatchSampler(25, 8, steps=10, seed=5, start=4))
    assert full[4:] == resumed
    idx = [i % 25 for b in full[:3] for i in b]  # an epoch is a permutation (25 items, 3 batches of 8 = 24)
    assert len(set(idx)) == 24
    shards = [list(StepBatchSampler(25, 8, steps=10, seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert all(a + b == g for a, b, g in zip(shards[0], shards[1], full))
    with pytest.raises(DataError, match="multiple of the number of processes"):
        StepBatchSampler(25, 7, steps=2, world_size=2)


def test_loader_resumes_on_the_same_batches():
    ds = SyntheticShapes(4, 32, length=40, seed=0)
    a = [y for _, y in make_loader(ds, 8, steps=6, seed=1)]
    b = [y for _, y in make_loader(ds, 8, steps=6, seed=1, start_step=3)]
    assert len(a) == 6 and all(torch.equal(x, y) for x, y in zip(a[3:], b))
    held = list(heldout_batches(ds, 16, max_batches=2))
    assert [len(y) for _, y in held] == [16, 16]


def test_data_config_names_the_bad_key():
    with pytest.raises(DataError, match="data.colour: unknown key"):
        DataConfig.from_dict({"colour": 1})
    with pytest.raises(DataError, match="data.train_dir: missing"):
        DataConfig.from_dict({"type": "imagefolder"})


@pytest.mark.parametrize("over,needle", [
    ({"crop_pct": 0}, "data.crop_pct: got 0, expected a number in (0, 1]"),
    ({"crop_pct": -1}, "data.crop_pct: got -1"),
    ({"scale": [2, 1]}, "data.scale: got [2, 1], expected [low, high]"),
    ({"scale": "abc"}, "data.scale: got 'abc'"),
    ({"mean": ["a", "b", "c"]}, "data.mean: got ['a', 'b', 'c'], expected a list of 3 numbers"),
    ({"std": [0, 0, 0]}, "data.std: got [0, 0, 0], expected a list of 3 numbers > 0"),
    ({"hflip": "maybe"}, "data.hflip: got 'maybe', expected true or false"),
    ({"val_fraction": "abc"}, "data.val_fraction: got 'abc'"),
])
def test_data_config_checks_every_transform_setting_up_front(over, needle):
    """Settings that used to fail mid-training (crop_pct 0), blame the images (scale) or raise a traceback."""
    from supernet.data import DataConfig, DataError
    with pytest.raises(DataError) as e:
        DataConfig.from_dict({"type": "imagefolder", "train_dir": "x", **over})
    assert needle in str(e.value)


def test_a_folder_scan_shows_its_progress_when_asked(tmp_path, capsys):
    _write_folder(tmp_path, n_per_class=3)
    scan_image_folder(str(tmp_path))
    assert capsys.readouterr().err == ""
    classes, samples, _ = scan_image_folder(str(tmp_path), progress=True)
    err = capsys.readouterr().err
    assert f"scanning {tmp_path}: " in err and " files" in err and len(samples) == 6


def test_an_interrupted_folder_scan_leaves_no_progress_bar_open(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a long scan (ImageNet: minutes) from a notebook, which keeps the traceback and so the bar: an
    open bar would push every later tqdm bar down a line."""
    from PIL import Image
    from tqdm import tqdm
    _write_folder(tmp_path, n_per_class=3)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Image, "open", interrupted)
    before = set(tqdm._instances)
    with pytest.raises(KeyboardInterrupt) as e:
        scan_image_folder(str(tmp_path), progress=True)
    assert e.traceback and [b.desc for b in set(tqdm._instances) - before] == []


def _counting_opens(monkeypatch):
    from PIL import Image
    opened, real = [], Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(os.path.basename(str(p))) or real(p, *a, **k))
    return opened


BAD0 = r"skipped 1 unreadable image file\(s\), e.g. .*bad0.jpg \(UnidentifiedImageError\)"


def test_a_second_scan_of_an_unchanged_folder_opens_no_file(tmp_path, monkeypatch, scan_cache):
    from supernet.data import scan_cache_path
    root = tmp_path / "data"
    _write_folder(root, n_per_class=3, corrupt=1)
    opened = _counting_opens(monkeypatch)
    with pytest.warns(UserWarning, match=BAD0):
        first = scan_image_folder(str(root))
    assert len(opened) == 7 and os.path.dirname(scan_cache_path(str(root))) == str(scan_cache / "scans")
    opened.clear()
    with pytest.warns(UserWarning, match=BAD0):
        again = scan_image_folder(str(root))
    assert opened == [] and again == first  # the same classes, samples and skipped count, no header opened


def test_a_changed_folder_is_checked_again_and_only_it(tmp_path, monkeypatch):
    from PIL import Image
    root = tmp_path / "data"
    _write_folder(root, n_per_class=3, corrupt=1)
    os.makedirs(root / "eel" / "deeper")
    for name in ("eel/e0.png", "eel/deeper/e1.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan_image_folder(str(root))
    opened = _counting_opens(monkeypatch)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "bad0.jpg", format="JPEG")  # mended
    os.remove(root / "dog" / "2.png")  # a folder that only lost a file is checked again too
    classes, samples, skipped = scan_image_folder(str(root))
    assert sorted(opened) == ["0.png", "0.png", "1.png", "1.png", "2.png", "bad0.jpg"]  # not eel's
    assert skipped == 0 and len(samples) == 8 and (str(root / "cat" / "bad0.jpg"), 0) in samples
    assert (str(root / "dog" / "2.png"), 1) not in samples
    opened.clear()
    with open(root / "eel" / "deeper" / "e1.png", "r+b") as f:  # the same name and size, damaged in place
        f.write(b"\0" * 8)
    os.utime(root / "eel" / "deeper" / "e1.png", ns=(1, 1))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        _, samples, skipped = scan_image_folder(str(root))
    assert opened == ["e1.png"] and skipped == 1 and len(samples) == 7  # only the sub-folder that changed


def test_a_damaged_or_unwritable_scan_cache_costs_only_the_checks(tmp_path, monkeypatch, scan_cache):
    from supernet.data import scan_cache_path
    root = tmp_path / "data"
    _write_folder(root, n_per_class=2)
    ref = scan_image_folder(str(root))
    path = scan_cache_path(str(root))
    for junk in ("{not json", '{"format": "vitslim-scan", "version": 1, "root": "/elsewhere", "dirs": {}}',
                 '{"format": "vitslim-scan", "version": 1, "root": %r, "dirs": {"cat": {"fp": 3}}}' % os.path.realpath(root)):
        with open(path, "w") as f:
            f.write(junk.replace("'", '"'))
        opened = _counting_opens(monkeypatch)
        assert scan_image_folder(str(root)) == ref
        assert len(opened) >= 2  # checked again
        monkeypatch.undo()
        monkeypatch.setenv("VITSLIM_CACHE_DIR", str(scan_cache))
    opened = _counting_opens(monkeypatch)
    assert scan_image_folder(str(root)) == ref and opened == []  # rewritten by the last scan
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("VITSLIM_CACHE_DIR", str(tmp_path / "afile"))  # cannot hold a folder: no cache, no error
    assert scan_image_folder(str(root)) == ref and len(opened) == 4
    monkeypatch.setenv("VITSLIM_CACHE_DIR", "")  # off
    assert scan_cache_path(str(root)) is None
    assert scan_image_folder(str(root)) == ref and len(opened) == 8
    assert not os.listdir(tmp_path / "data" / "cat") == []  # the data folder itself is never written
    assert sorted(os.listdir(tmp_path / "data")) == ["cat", "dog"]


def test_a_held_out_subset_of_an_image_folder_covers_every_class(tmp_path):
    """Image folders list samples class by class: the first n of ImageNet's validation set are a few classes.
    Evaluation subsets (the search's --eval-images, training's eval_batches) spread over all of them; the
    synthetic task (labels i % classes) keeps its first n images."""
    from collections import Counter
    from PIL import Image
    from nas.evaluator import stack_batches
    from supernet.data import subset_indices
    for c in range(10):
        os.makedirs(tmp_path / "val" / f"c{c}")
        for i in range(20):
            Image.fromarray(np.full((8, 8, 3), 10 * c + i, np.uint8)).save(tmp_path / "val" / f"c{c}" / f"{i}.png")
    held = ImageFolder(str(tmp_path / "val"), image_size=16, train=False)
    counts = Counter(int(y) for _, ys in stack_batches(held, 40, 8) for y in ys)
    assert counts == {c: 4 for c in range(10)}
    loader = heldout_batches(held, batch_size=10, max_batches=3)
    assert Counter(int(y) for _, ys in loader for y in ys) == {c: 3 for c in range(10)}
    assert subset_indices(held, 500) == list(range(200))  # all of it, in order
    syn = SyntheticShapes(4, 16, length=100, split="heldout")
    assert subset_indices(syn, 12) == list(range(12))
    xs = torch.cat([x for x, _ in stack_batches(syn, 12, 5)])
    assert torch.equal(xs, torch.stack([syn[i][0] for i in range(12)]))


def test_linked_folders_leading_back_into_the_data_are_not_followed(tmp_path):
    """A link to the root inside a class folder listed every other class's images under that class (and the
    same ones again, ~40 levels deep, until ELOOP); a link to another class did the same once. Links that
    lead elsewhere are still followed."""
    from supernet.data import scan_image_folder
    _write_folder(tmp_path / "data", n_per_class=3)
    _write_folder(tmp_path / "extra", n_per_class=2)
    root = tmp_path / "data"
    os.symlink("..", root / "cat" / "all")              # back to the root: a loop through every class
    os.symlink(os.path.join("..", "dog"), root / "cat" / "dogs")   # another class
    os.makedirs(root / "dog" / "sub")
    os.symlink("..", root / "dog" / "sub" / "up")       # back to its own class: a loop
    os.symlink(tmp_path / "extra" / "dog", root / "dog" / "more")  # images kept elsewhere: followed
    with pytest.warns(UserWarning, match=r"skipped 3 linked folder\(s\) leading back into the data"):
        classes, samples, skipped = scan_image_folder(str(root), cache=False)
    assert classes == ["cat", "dog"] and skipped == 0
    by_class = {c: sorted(os.path.relpath(p, root) for p, lab in samples if classes[lab] == c) for c in classes}
    assert by_class["cat"] == ["cat/0.png", "cat/1.png", "cat/2.png"]
    assert by_class["dog"] == ["dog/0.png", "dog/1.png", "dog/2.png", "dog/more/0.png", "dog/more/1.png"]


def _image(path, arr):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def test_samples_are_normalised_with_the_configured_mean_and_std(tmp_path):
    """A one-colour image stays one colour through any crop, resize or flip: every pixel of channel c reads
    (value / 255 - mean[c]) / std[c], with the config's mean and std (ImageNet's by default)."""
    for c in ("a", "b"):
        _image(tmp_path / c / "x.png", np.broadcast_to(np.array([255, 0, 51], np.uint8), (20, 30, 3)))
    rgb = torch.tensor([1.0, 0.0, 0.2])
    for over, mean, std in (({}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                            ({"mean": [0.5, 0.25, 0.0], "std": [0.5, 2.0, 0.1]}, (0.5, 0.25, 0.0), (0.5, 2.0, 0.1))):
        cfg = DataConfig.from_dict({"type": "imagefolder", "train_dir": str(tmp_path), "val_fraction": 0.5, **over})
        for ds in build_datasets(cfg, image_size=16, num_classes=2):
            x = ds[0][0]
            want = (rgb - torch.tensor(mean)) / torch.tensor(std)
            assert x.shape == (3, 16, 16)
            assert torch.allclose(x, want[:, None, None].expand(3, 16, 16), atol=1e-5), (over, ds.train)


def test_eval_transform_resizes_the_short_side_to_size_over_crop_pct_and_takes_the_centre(tmp_path):
    """32 x 32, black with a white 16 x 16 centre, left half of the centre red: at image_size 16, crop_pct 0.5
    resizes to 32 (no change) and crops the centre (all of the white square: red left, white right); crop_pct 1
    resizes the whole image to 16 (a black border). Rows are y, columns x."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    img[8:24, 8:16, 1:] = 0  # red left half
    for c in ("a", "b"):
        _image(tmp_path / c / "x.png", img)
    cfg = DataConfig.from_dict({"type": "imagefolder", "train_dir": str(tmp_path), "val_fraction": 0.5,
                                "crop_pct": 0.5, "mean": [0, 0, 0], "std": [1, 1, 1]})
    _, held = build_datasets(cfg, image_size=16, num_classes=2)
    x = held[0][0]
    assert torch.equal(x[0], torch.ones(16, 16))                   # red channel: all of the centre square
    assert torch.equal(x[1, :, :8], torch.zeros(16, 8)) and torch.equal(x[1, :, 8:], torch.ones(16, 8))
    whole = ImageFolder(str(tmp_path), image_size=16, train=False, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))[0][0]
    assert float(whole[0, 0, 0]) == 0.0 and float(whole[0, 8, 8]) == 1.0   # border black, centre lit


def test_train_crops_take_the_configured_area_inside_the_image_and_flip_only_when_asked(tmp_path):
    """Random-resized crops cover scale[0]..scale[1] of the image's area at aspect 3/4..4/3, inside the image
    (a wide one here); the horizontal flip happens to about half the samples with hflip, to none without."""
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :30] = 255  # left half white
    for c in ("a", "b"):
        _image(tmp_path / c / "x.png", img)
    cfg = DataConfig.from_dict({"type": "imagefolder", "train_dir": str(tmp_path), "scale": [0.1, 0.2]})
    tr, _ = build_datasets(cfg, image_size=16, num_classes=2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = tr._crop_box(60, 20, rng)
        assert 0 <= x0 < x1 <= 60 and 0 <= y0 < y1 <= 20
        area = (x1 - x0) * (y1 - y0)
        assert 0.1 * 1200 * 0.9 <= area <= 0.2 * 1200 * 1.1, area
    for hflip in (True, False):
        cfg = DataConfig.from_dict({"type": "imagefolder", "train_dir": str(tmp_path), "scale": [1.0, 1.0],
                                    "hflip": hflip, "mean": [0, 0, 0], "std": [1, 1, 1]})
        tr, _ = build_datasets(cfg, image_size=16, num_classes=2)
        # the whole image each time (centre square when the aspect does not fit): flipped iff its left is dark
        flipped = [float(tr[i][0][0, 8, 0]) < 0.5 for i in range(40)]
        assert (0 < sum(flipped) < 40) if hflip else not any(flipped)
    # a quarter of a half-white square: some crops fall in its white half, some in its black one
    _image(tmp_path / "a" / "x.png", np.where(np.arange(32)[None, :, None] < 16, 255, 0) * np.ones((32, 32, 3)))
    cfg = DataConfig.from_dict({"type": "imagefolder", "train_dir": str(tmp_path), "scale": [0.25, 0.25],
                                "mean": [0, 0, 0], "std": [1, 1, 1]})
    tr, _ = build_datasets(cfg, image_size=16, num_classes=2)
    means = [float(tr[i * len(tr)][0].mean()) for i in range(40)]  # sample 0 (the square) in 40 epochs
    assert min(means) < 0.1 and max(means) > 0.9


def test_synthetic_held_out_split_is_other_images_in_the_configured_normalisation():
    cfg = DataConfig.from_dict({"train_size": 8, "heldout_size": 4, "mean": [0.2, 0.4, 0.6], "std": [0.5, 0.25, 2.0]})
    tr, held = build_datasets(cfg, image_size=32, num_classes=4, seed=1)
    assert len(tr) == 8 and len(held) == 4
    for i in range(4):
        img = torch.from_numpy(held.render(i)).permute(2, 0, 1)
        want = (img - torch.tensor([0.2, 0.4, 0.6])[:, None, None]) / torch.tensor([0.5, 0.25, 2.0])[:, None, None]
        assert torch.allclose(held[i][0], want, atol=1e-6)
        assert not torch.equal(held[i][0], tr[i][0]) and held[i][1] == tr[i][1]  # same class, another image


def test_held_out_fraction_rounds_and_must_leave_training_images_and_val_dir_classes_must_match(tmp_path):
    _write_folder(tmp_path / "t", n_per_class=3)  # 6 images
    cfg = DataConfig.from_dict({"type": "imagefolder", "train_dir": str(tmp_path / "t"), "val_fraction": 0.3})
    tr, ho = build_datasets(cfg, image_size=16, num_classes=2)
    assert (len(tr), len(ho)) == (4, 2)  # round(0.3 * 6) = 2 held out
    cfg = DataConfig.from_dict({"type": "imagefolder", "train_dir": str(tmp_path / "t"), "val_fraction": 0.95})
    with pytest.raises(DataError, match=r"data.val_fraction: got 0.95, leaves no training image of 6"):
        build_datasets(cfg, image_size=16, num_classes=2)
    _write_folder(tmp_path / "v", n_per_class=1)
    os.rename(tmp_path / "v" / "dog", tmp_path / "v" / "cow")
    cfg = DataConfig.from_dict({"type": "imagefolder", "train_dir": str(tmp_path / "t"), "val_dir": str(tmp_path / "v")})
    with pytest.raises(DataError, match=r"its classes differ from train_dir's \(e.g. cow, dog\)"):
        build_datasets(cfg, image_size=16, num_classes=2)


def test_later_epochs_are_new_permutations_addressed_past_the_dataset_length():
    """Indices of epoch e are e * len + i (the dataset draws that epoch's augmentation from them), and each
    epoch is its own permutation."""
    s = StepBatchSampler(10, 5, steps=4, seed=2)
    b = list(s)
    assert all(0 <= i < 10 for i in b[0] + b[1]) and all(10 <= i < 20 for i in b[2] + b[3])
    assert sorted(b[0] + b[1]) == list(range(10)) and sorted(b[2] + b[3]) == list(range(10, 20))
    assert [i - 10 for i in b[2] + b[3]] != b[0] + b[1]


def test_greyscale_32_bit_and_float_images_keep_their_brightness_and_other_channel_counts_get_imagenets_statistics(
        tmp_path):
    """PIL's 'I' (32-bit) holding 8-bit values and 'F' holding [0, 1] (1.0 included) read at their brightness;
    one channel is normalised by ImageNet's mean and std averaged over RGB, a fourth channel by 0.5 / 0.5."""
    from PIL import Image
    for mode, arr in (("I", np.full((16, 16), 102, np.int32)), ("F", np.full((16, 16), 0.4, np.float32))):
        arr = arr.copy()
        arr[0, 0] = 255 if mode == "I" else 1.0  # the top of the range
        for c in ("a", "b"):
            os.makedirs(tmp_path / mode / c, exist_ok=True)
            Image.fromarray(arr, mode).save(tmp_path / mode / c / "x.tif")
        assert Image.open(tmp_path / mode / "a" / "x.tif").mode == mode
        x = ImageFolder(str(tmp_path / mode), image_size=16, train=False, crop_pct=1.0, in_chans=1)[0][0]
        mean, std = sum((0.485, 0.456, 0.406)) / 3, sum((0.229, 0.224, 0.225)) / 3
        assert x.shape == (1, 16, 16)
        assert float(x[0, 8, 8]) == pytest.approx((102 / 255 - mean) / std, abs=1e-5), mode
        assert float(x[0, 0, 0]) == pytest.approx((1.0 - mean) / std, abs=1e-5), mode
    rgba = ImageFolder(str(tmp_path / "I"), image_size=16, train=False, crop_pct=1.0, in_chans=4)
    assert rgba.mean == (0.485, 0.456, 0.406, 0.5) and rgba.std == (0.229, 0.224, 0.225, 0.5)


def test_data_config_accepts_the_smallest_values_and_refuses_below_them():
    low = {"train_size": 1, "heldout_size": 1, "distractors": 0, "image_size": 16, "num_classes": 2}
    c = DataConfig.from_dict(low)
    assert (c.train_size, c.heldout_size, c.distractors, c.image_size, c.num_classes) == (1, 1, 0, 16, 2)
    for k, v in low.items():
        with pytest.raises(DataError, match=rf"^data\.{k}: got {v - 1}, expected an integer >= {v}$"):
            DataConfig.from_dict({k: v - 1})
