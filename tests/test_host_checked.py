"""Values checked on the host (fastclip/models/host_checked.py, fastclip/train/step_checks.py): the towers
skip their value reads inside ``values_checked_on_host`` and only there, and the trainer's host check
refuses what the towers would have refused, with the same messages."""

from __future__ import annotations

import pytest
import torch

from fastclip.models import create_model
from fastclip.models.host_checked import values_checked, values_checked_on_host
from fastclip.train.step_checks import check_batch_on_host


@pytest.fixture(scope="module")
def model():
    return create_model("tiny", vocab_size=50, context_length=8, image_size=32, vision={"depth": 1}).eval()


def _batch(model):
    images = torch.randn(2, 3, 32, 32)
    texts = torch.randint(0, 50, (2, 8))
    return images, texts


def test_the_towers_check_values_outside_the_block_and_trust_them_inside(model):
    images, texts = _batch(model)
    images[0, 0, 0, 0] = float("nan")
    bad_ids = texts.clone()
    bad_ids[1, 3] = 50
    with pytest.raises(ValueError, match="images: expected finite pixel values"):
        model.encode_image(images)
    with pytest.raises(ValueError, match=r"texts: expected token ids in \[0, 50\)"):
        model.encode_text(bad_ids)
    assert not values_checked()
    with values_checked_on_host():
        assert values_checked()
        assert model.encode_image(images).shape[0] == 2  # NaN passes: the caller vouched for the values
        with pytest.raises(TypeError, match="texts: expected an integer tensor"):  # types still checked
            model.encode_text(texts.float())
    assert not values_checked()


def test_the_block_ends_on_an_exception():
    with pytest.raises(RuntimeError):
        with values_checked_on_host():
            raise RuntimeError("inside")
    assert not values_checked()


def test_check_batch_on_host_refuses_what_the_towers_refuse(model):
    images, texts = _batch(model)
    assert check_batch_on_host(model, images, texts) is True
    hard_negatives = torch.randint(0, 50, (2, 3, 8))  # (b, 1 + K, T)
    assert check_batch_on_host(model, images, hard_negatives) is True
    nan = images.clone()
    nan[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="images: expected finite pixel values"):
        check_batch_on_host(model, nan, texts)
    hard_negatives[1, 2, 0] = -1
    with pytest.raises(ValueError, match=r"texts: expected token ids in \[0, 50\)"):
        check_batch_on_host(model, images, hard_negatives)


def test_device_tensors_are_left_to_the_towers(model):
    images, texts = _batch(model)
    assert check_batch_on_host(model, images.to("meta"), texts.to("meta")) is False
