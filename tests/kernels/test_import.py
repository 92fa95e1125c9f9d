"""From the source tree the kernels/ folder is also importable as "kernels" (a PyPI package name)."""

import importlib

import flash_dist


def test_top_level_kernels_name_is_an_alias_not_a_second_copy():
    import kernels

    assert kernels is flash_dist.kernels
    assert importlib.import_module("kernels").flash_attention is flash_dist.flash_attention


def test_transformers_probe_for_the_kernels_package_says_no():
    from transformers.utils import import_utils

    assert import_utils.is_kernels_available() is False
