"""The published train/validation transforms on numpy arrays."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipmt_fast.data.transforms import (GAUSSIAN_KERNEL_5, IGNORE_LABEL, IMAGENET_MEAN, IMAGENET_STD, TrainTransform,
                                       ValTransform, gaussian_blur5, resize_bilinear, resize_nearest, rotate,
                                       to_tensors, validation_size)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (h, w, 3)).astype(np.float32)


def _normalised(image):
    return (torch.from_numpy(image).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]


@pytest.mark.parametrize("size", [(7, 5), (20, 31), (13, 13)])
def test_resize_bilinear_matches_half_pixel_bilinear(size):
    # OpenCV's INTER_LINEAR and torch's bilinear (align_corners=False, no antialias) share the
    # half-pixel convention, for up- and down-sampling.
    image = _image(11, 17)
    ours = resize_bilinear(image, *size)
    theirs = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=size, mode="bilinear",
                           align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("size", [(7, 5), (20, 31), (11, 17)])
def test_resize_nearest_floors_like_opencv(size):
    label = np.random.default_rng(1).integers(0, 5, (11, 17)).astype(np.uint8)
    theirs = F.interpolate(torch.from_numpy(label)[None, None].float(), size=size, mode="nearest")[0, 0]
    np.testing.assert_array_equal(resize_nearest(label, *size), theirs.numpy().astype(np.uint8))


def test_rotate_zero_is_identity_and_90_maps_pixels():
    image, label = _image(6, 6), np.arange(36, dtype=np.uint8).reshape(6, 6)
    same_image, same_label = rotate(image, label, 0.0, IMAGENET_MEAN)
    np.testing.assert_allclose(same_image, image, atol=1e-3)
    np.testing.assert_array_equal(same_label, label)
    # Rotation about (w/2, h/2) = (3, 3) in pixel-index coordinates: dst(x, y) = src(6 - y, x).
    turned_image, turned_label = rotate(image, label, 90.0, IMAGENET_MEAN)
    for y in range(6):
        for x in range(6):
            if 6 - y <= 5:
                assert turned_label[y, x] == label[x, 6 - y]
                np.testing.assert_allclose(turned_image[y, x], image[x, 6 - y], atol=1e-3)
            else:  # uncovered: the fills
                assert turned_label[y, x] == IGNORE_LABEL
                np.testing.assert_allclose(turned_image[y, x], IMAGENET_MEAN, atol=1e-3)


def test_gaussian_blur_is_opencv_5_tap_kernel():
    impulse = np.zeros((9, 9, 3), np.float32)
    impulse[4, 4] = 1.0
    blurred = gaussian_blur5(impulse)
    np.testing.assert_allclose(blurred[2:7, 2:7, 0], np.outer(GAUSSIAN_KERNEL_5, GAUSSIAN_KERNEL_5), atol=1e-7)
    assert GAUSSIAN_KERNEL_5.sum() == pytest.approx(1.0)
    flat = np.full((5, 6, 3), 42.0, np.float32)
    np.testing.assert_allclose(gaussian_blur5(flat), flat, rtol=1e-6)


def test_to_tensors_normalises_with_imagenet_statistics():
    image = np.broadcast_to(np.asarray(IMAGENET_MEAN, np.float32), (2, 3, 3)).copy()
    image[0, 0] += np.asarray(IMAGENET_STD, np.float32)
    tensor, label = to_tensors(image, np.zeros((2, 3), np.uint8))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32 and label.dtype == torch.int64
    expected = torch.zeros(3, 2, 3)
    expected[:, 0, 0] = 1.0
    torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=0)


def test_train_transform_pads_small_images_with_mean_and_255():
    # No scaling, rotation, blur or flip: only the centred padding and the crop remain.
    t = TrainTransform(size=(17, 17), scale=(1.0, 1.0), rotate_p=0.0, blur_p=0.0, flip_p=0.0)
    image, label = _image(9, 11), np.ones((9, 11), np.uint8)
    x, y = t(image, label, np.random.default_rng(0))
    assert x.shape == (3, 17, 17) and y.shape == (17, 17)
    top, left = (17 - 9) // 2, (17 - 11) // 2
    torch.testing.assert_close(x[:, top:top + 9, left:left + 11], _normalised(image), atol=1e-5, rtol=0)
    inside = torch.zeros(17, 17, dtype=torch.bool)
    inside[top:top + 9, left:left + 11] = True
    assert (y[inside] == 1).all() and (y[~inside] == IGNORE_LABEL).all()
    assert x[:, ~inside].abs().max() < 1e-5  # the mean normalises to 0


def test_train_transform_flip_and_determinism():
    t = TrainTransform(size=(9, 9), scale=(1.0, 1.0), rotate_p=0.0, blur_p=0.0, flip_p=1.0)
    image, label = _image(9, 9), (np.arange(81).reshape(9, 9) % 2).astype(np.uint8)
    x, y = t(image, label, np.random.default_rng(0))
    torch.testing.assert_close(x, _normalised(image[:, ::-1].copy()), atol=1e-5, rtol=0)
    assert torch.equal(y, torch.from_numpy(label[:, ::-1].astype(np.int64)))

    full = TrainTransform(size=(17, 17))
    big_image, big_label = _image(23, 19, seed=3), np.random.default_rng(4).integers(0, 2, (23, 19)).astype(np.uint8)
    a = full(big_image, big_label, np.random.default_rng(7))
    b = full(big_image, big_label, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(a[1].unique().tolist()) <= {0, 1, IGNORE_LABEL}


def test_train_crop_redraws_to_keep_the_foreground():
    # A 6x6 object in a 40x40 image, 25x25 crops: a single random window keeps it with probability
    # 6/16 * 5/16 = 12%; the published rule re-draws up to 31 times while < 85% of it is kept.
    t = TrainTransform(size=(25, 25), scale=(1.0, 1.0), rotate_p=0.0, blur_p=0.0, flip_p=0.0)
    label = np.zeros((40, 40), np.uint8)
    label[5:11, 30:36] = 1
    kept = [int((t(_image(40, 40), label, np.random.default_rng(seed))[1] == 1).sum()) for seed in range(20)]
    assert sum(k >= 0.85 * 36 for k in kept) >= 15


def test_validation_size_floors_to_multiples_of_8():
    assert validation_size(500, 375, 473) == (472, 352)  # 375 * 473/500 = 354.75 -> 354 -> 352
    assert validation_size(375, 500, 473) == (352, 472)
    assert validation_size(60, 100, 33) == (16, 32)
    assert validation_size(20, 10, 33, only_shrink=True) == (20, 10)


def test_val_transform_zero_pads_and_marks_padding():
    image = _image(100, 60)
    label = np.random.default_rng(2).integers(0, 2, (100, 60)).astype(np.uint8)
    x, y = ValTransform(33)(image, label)
    assert x.shape == (3, 33, 33) and y.shape == (33, 33)
    h, w = 32, 16
    assert (y[h:] == IGNORE_LABEL).all() and (y[:, w:] == IGNORE_LABEL).all()
    torch.testing.assert_close(y[:h, :w], torch.from_numpy(resize_nearest(label, h, w).astype(np.int64)))
    zero = _normalised(np.zeros((1, 1, 3), np.float32))[:, 0, 0]
    torch.testing.assert_close(x[:, h:, :], zero[:, None, None].expand(3, 33 - h, 33), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, :h, :w], _normalised(resize_bilinear(image, h, w)), atol=1e-5, rtol=0)
    # Without a label (prediction): 0 on the content, 255 on the padding.
    _, padding = ValTransform(33)(image)
    assert (padding[:h, :w] == 0).all() and int((padding == IGNORE_LABEL).sum()) == 33 * 33 - h * w
