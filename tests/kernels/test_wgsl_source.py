"""kernels/wgsl_source.py and every WGSL file: assembly everywhere, naga validation where
wgpu finds an adapter (lavapipe in CI, which sets EMBER_REQUIRE_WEBGPU=1).

naga (wgpu's shader translator) validates WGSL independently of the target, before
translating it to SPIR-V, MSL or HLSL: a module it accepts uses nothing Vulkan-only,
so the Metal and D3D12 backends get the same source. create_shader_module runs that
validation; creating the compute pipeline also checks each entry point's bindings
and workgroup memory against the device's limits.
"""
from __future__ import annotations

import re

import pytest

from ember.kernels import wgsl_source
from ember.plugins import webgpu
from tests.conftest import REQUIRE_WEBGPU, absent

PROBE = webgpu.probe()


def test_every_file_is_part_of_a_module():
    mods = wgsl_source.all_modules()
    for path in wgsl_source.wgsl_files():
        text = path.read_text()
        assert any(text in m or text.replace("const TB: u32 = 1u;", "const TB: u32 = 8u;") in m
                   for m in mods.values()), f"{path.name} is in no module"
    assert len(mods) == len(wgsl_source.KINDS) * len(wgsl_source.TOKEN_TILES) + len(wgsl_source.ROW_KERNELS)


def test_matvec_modules_set_the_token_tile():
    assert "const TB: u32 = 8u;" in wgsl_source.matvec_source("q4_k", 8)
    assert "const TB: u32 = 1u;" in wgsl_source.matvec_source("q4_k", 1)
    assert "fn dequant(" in wgsl_source.matvec_source("q6_k")


def test_unknown_kinds_and_tiles_are_refused():
    with pytest.raises(wgsl_source.SourceError, match="no WGSL dequant for kind 'q2_k'"):
        wgsl_source.matvec_source("q2_k")
    with pytest.raises(wgsl_source.SourceError, match="token tile 4"):
        wgsl_source.matvec_source("q4_0", 4)
    with pytest.raises(wgsl_source.SourceError, match="no row kernel 'softmax'"):
        wgsl_source.row_source("softmax")


def test_no_extension_is_enabled():
    """Core WGSL only: an `enable` directive (f16, subgroups) would make a module adapter-specific."""
    for key, src in wgsl_source.all_modules().items():
        assert not re.search(r"^\s*enable\s", src, re.M), key


@pytest.mark.parametrize("key", sorted(wgsl_source.all_modules()))
def test_module_validates_and_its_pipelines_build(key):
    if not PROBE.available:
        absent(f"no WebGPU adapter: {PROBE.reason}", REQUIRE_WEBGPU)
    _, _, device = webgpu._gpu()
    src = wgsl_source.all_modules()[key]
    module = device.create_shader_module(label=key, code=src)
    for entry in re.findall(r"@compute @workgroup_size\(\d+\)\s+fn (\w+)\(", src):
        device.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": entry})
