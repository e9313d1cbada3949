"""Task classes for offline configs whose Hub dataset spans two configs (GQA: questions and images), and the base of
the project's tasks whose YAML names their class."""

from typing import Any

from datasets import concatenate_datasets, load_dataset
from lmms_eval.api.task import ConfigurableTask


class ClassConfigTask(ConfigurableTask):
    """A task built from a YAML that names its own class (`class: !function ...`): the `class` key is dropped from the
    config `ConfigurableTask` reads."""

    def __init__(self, *args, config: dict[str, Any] | None = None, **kwargs) -> None:
        if config is not None:
            config = dict(config)
            config.pop("class", None)
        super().__init__(*args, config=config, **kwargs)


class LocalGQATask(ClassConfigTask):
    """`gqa_local`: the questions from `data_files`, each given its image from `images_files` (imageId = id)."""

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        arguments = dict(dataset_kwargs or {})
        images_files = arguments.pop("images_files", None)
        if not images_files:
            raise ValueError("gqa_local: dataset_kwargs.images_files (the testdev_balanced_images parquet) is required")
        super().download(arguments)
        images = load_dataset("parquet", data_files={"images": images_files}, split="images")
        image_by_id = dict(zip(images["id"], range(len(images))))
        for split in self.dataset:
            missing = sorted(set(self.dataset[split]["imageId"]) - image_by_id.keys())
            if missing:
                raise ValueError(f"gqa_local: {images_files} has no image for imageId {missing[:5]}")
            rows = [image_by_id[image_id] for image_id in self.dataset[split]["imageId"]]
            matched = images.select(rows).select_columns(["image"])
            self.dataset[split] = concatenate_datasets([self.dataset[split], matched], axis=1)
        self.dataset_no_image = self.dataset
