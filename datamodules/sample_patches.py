"""Natural-image patches from the two photographs bundled with scikit-learn (``load_sample_images``: a temple and a
flower): seeded random crops, downscaled to ``image_size``. An offline far-OOD set for the digits demos (natural
colour textures against grey handwritten digits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_methods.datamodules.base import ImageDataModule
from lightning_methods.datamodules.ood_images import OODImageDataModule


def sample_patches(n: int, image_size: int = 32, crop: int = 96, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 patches (n, 3, image_size, image_size): crops of side ``crop`` at seeded positions of the two
    bundled photographs (alternating), area-downscaled."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(img.copy()).permute(2, 0, 1) for img in load_sample_images().images]
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        top = int(torch.randint(0, photo.shape[1] - crop + 1, (1,), generator=gen))
        left = int(torch.randint(0, photo.shape[2] - crop + 1, (1,), generator=gen))
        patch = photo[:, top : top + crop, left : left + crop].float()[None]
        out[i] = F.interpolate(patch, size=(image_size, image_size), mode="area")[0].round().clamp(0, 255).byte()
    return out


class SamplePatchesDataModule(OODImageDataModule):
    """Patches of scikit-learn's sample photographs; splits ``"train"`` and ``"test"`` use different seeds.

    Args:
        num_samples: patches per split.
        crop: side of the crops in the 427 x 640 photographs.
        image_size: side of the returned images.
        seed: seed of the crop positions.
        batch_size: batch size of the loaders.
    """

    num_classes = 2
    display_name = "scikit-learn sample-image patches"

    def __init__(self, num_samples: int = 500, crop: int = 96, image_size: int = 32, seed: int = 0,
                 batch_size: int = 128) -> None:
        ImageDataModule.__init__(self, batch_size=batch_size, num_workers=0, augment="none", seed=seed)
        self.num_samples, self.crop, self.image_size = num_samples, crop, image_size
        self.train_split, self.test_split, self.download = "train", "test", False

    def missing(self, split: str) -> list:
        return []

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_split(split)
        images = sample_patches(self.num_samples, self.image_size, self.crop, self.seed * 2 + (split == "test"))
        return images, torch.arange(self.num_samples) % 2  # label: which photograph
