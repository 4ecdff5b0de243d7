"""Training data: train/validation split of real stacks, and the sampler's crops (normalisation
as at inference, the noise hook on whole triplets, augmentation shared by the three images)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import noisy_test_stack

from nrrn_daemon.errors import InputError
from nrrn_daemon.finetune.data import Sampler, prepare_sources
from nrrn_daemon.finetune.training import TrainSettings
from nrrn_daemon.model.checkpoints import Normalisation, slice_stats


def test_training_and_validation_triplets_are_disjoint() -> None:
    stack = noisy_test_stack(n=40, size=32)
    (src,) = prepare_sources([stack], TrainSettings(steps=1, validation_fraction=0.2))
    train_slices = {i for t in src.train for i in t}
    val_slices = {i for t in src.val for i in t}
    assert src.val and train_slices.isdisjoint(val_slices)
    assert src.info["validation_slices"] and src.info["train_triplets"] == len(src.train)
    (src,) = prepare_sources([stack], TrainSettings(steps=1, validation_slices=(10, 11, 12)))
    assert src.val == [(10, 11, 12)]
    assert all({10, 11, 12}.isdisjoint(t) for t in src.train) and (8, 9, 10) not in src.train
    with pytest.raises(InputError, match="outside"):
        prepare_sources([stack], TrainSettings(steps=1, validation_slices=(40,)))


def test_slice_mode_uses_the_whole_centre_slice_stats_like_the_denoiser() -> None:
    # One image at five brightnesses: every slice has its own stats, and no drift between them
    # (the sampler aligns drifted neighbours; this test is about the normalisation alone).
    base = noisy_test_stack(n=1, size=48)[0].astype(np.float64)
    stack = np.stack([base * (100 + 20 * k) for k in range(5)]).astype(np.uint16)
    (src,) = prepare_sources([stack], TrainSettings(steps=1, validation_fraction=0))
    sampler = Sampler([src], Normalisation("slice", 0.0, 1.0), 16, augment=False, noise=None)
    sample = sampler.sample(np.random.default_rng(4))
    # Find which triplet/crop was drawn and redo the normalisation by hand.
    for j in range(1, 4):
        mean, std = slice_stats(stack[j])
        assert Normalisation("slice").stats_for(stack[j]) == (mean, std)
        for y in range(48 - 16 + 1):
            for x in range(48 - 16 + 1):
                crop = stack[j - 1 : j + 2, y : y + 16, x : x + 16].astype(np.float32)
                if np.allclose(sample, (crop - mean) / std, atol=1e-5):
                    return
    pytest.fail("the sample is not a triplet crop normalised with its centre slice's stats")


def test_noise_hook_sees_whole_triplets_and_augmentation_is_shared() -> None:
    stack = np.repeat(noisy_test_stack(n=1, size=32), 4, axis=0)  # identical slices
    (src,) = prepare_sources([stack], TrainSettings(steps=1, validation_fraction=0))
    calls: list[tuple[int, ...]] = []

    def hook(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        calls.append(image.shape)
        return image

    sampler = Sampler([src], Normalisation("dataset", 100, 30), 16, augment=True, noise=hook)
    for seed in range(6):
        sample = sampler.sample(np.random.default_rng(seed))
        # Same transform on all three: identical slices stay identical after augmentation.
        assert np.array_equal(sample[0], sample[1]) and np.array_equal(sample[1], sample[2])
    assert calls == [(3, 32, 32)] * 6  # one call per triplet; small slices: the whole slice


def test_no_triplet_holds_an_unusable_slice(fib25) -> None:
    from nrrn_daemon.sim.noise import noisy_stack

    clean = fib25[:30, :64, :64].copy()
    clean[20] = fib25[28, 150:214, 150:214]  # unrelated content
    stack = noisy_stack(clean, "gaussian:25", seed=0)
    stack[5] = 0  # blank
    stack[12, 32:] = 0  # cut short
    (src,) = prepare_sources([stack], TrainSettings(steps=1, validation_slices=(26, 27, 28)))
    assert sorted(src.info["unusable_slices"]) == ["12", "20", "5"]
    used = {i for t in (*src.train, *src.val) for i in t}
    assert used and used.isdisjoint({5, 12, 20})
    assert (3, 4, 5) not in src.train and (2, 3, 4) in src.train
    (everything,) = prepare_sources(
        [stack], TrainSettings(steps=1, validation_slices=(26, 27, 28), frames=None)
    )
    assert (4, 5, 6) in everything.train and everything.info["unusable_slices"] == {}
