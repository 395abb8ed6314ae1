import pytest

from davit.tasks.scenes import build_scenes


@pytest.fixture(scope="session")
def scenes(tmp_path_factory):
    """A tiny scene dataset (64 px canvases) shared by the task tests."""
    out = tmp_path_factory.mktemp("scenes")
    build_scenes(out, num_train=6, num_val=4, size=64, items=(1, 3), item_frac=(0.25, 0.45), seed=3)
    return out
