"""The default segmenter trunk, DINO ResNet-50 dilated to output stride 8, built from a checkpoint in the
official key layout (random values) and trained for a step: the path `train` takes by default."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.backbones import BackboneParams
from pipeline.segmenter import Segmenter
from stages.train import Params, train_step
from test_backbones import LAYOUT_FILE, random_state


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
    if not LAYOUT_FILE.is_file():
        pytest.skip(f"{LAYOUT_FILE} not present")
    entry = json.loads(LAYOUT_FILE.read_text())["dino_resnet50"]
    path = tmp_path_factory.mktemp("dino") / entry["checkpoint_file"]
    torch.save(random_state(entry["keys"], seed=2), path)
    return path, entry["keys"]


def test_the_default_trunk_loads_the_official_layout_strictly_at_output_stride_8(resnet_checkpoint):
    path, keys = resnet_checkpoint
    assert Params().backbone == "dino_resnet50"
    net = Segmenter(BackboneParams("dino_resnet50", weights=str(path)), num_classes=4)
    trunk_keys = {k for k in net.trunk.state_dict()}
    assert trunk_keys == {k for k in keys if not k.startswith("fc.")}  # every official key, nothing invented
    with torch.inference_mode():
        features = net.eval().features(torch.zeros(1, 3, 64, 96))
    assert features.shape == (1, 2048, 8, 12)  # dilated: stride 8, not 32


def test_one_training_step_of_the_default_trunk_changes_its_weights(resnet_checkpoint):
    torch.manual_seed(0)
    net = Segmenter(BackboneParams("dino_resnet50", weights=str(resnet_checkpoint[0])), num_classes=3).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    image = torch.randn(2, 3, 64, 64)
    mask = torch.randint(0, 3, (2, 64, 64))
    mask[:, :8] = 255
    loss = train_step(net, torch.nn.CrossEntropyLoss(ignore_index=255), optimizer, scaler, (image, mask))
    assert torch.isfinite(loss)
    changed = [k for k, v in net.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("trunk.layer4") for k in changed) and any(k.startswith("head.") for k in changed)
