"""Typed facades: protocol members and the checked create_* functions."""

from __future__ import annotations

import pytest
from torch import nn

import medtl
from medtl.errors import PluginError
from medtl.protocols import (Backbone, Pooling, Source, Strategy, create_backbone, create_pooling,
                             create_source, create_strategy, missing_members)


def test_builtins_have_protocol_members():
    assert isinstance(create_backbone("resnet10", spatial_dims=2, in_channels=1), Backbone)
    assert create_pooling("avg", in_channels=4).out_features == 4
    assert isinstance(create_source("dicom"), Source)
    assert missing_members(create_strategy("finetune"), Strategy) == []


def test_missing_member_names_plugin():
    class NoOutFeatures(nn.Module):
        def __init__(self, in_channels):
            super().__init__()

    class Plugin:
        @medtl.hookimpl
        def medtl_register_poolings(self):
            return {"incomplete": NoOutFeatures}

    medtl.get_host().register(Plugin(), name="incomplete-plugin")
    assert missing_members(NoOutFeatures(3), Pooling) == ["out_features"]
    with pytest.raises(PluginError, match="'incomplete-plugin'.*without out_features"):
        create_pooling("incomplete", in_channels=3)
