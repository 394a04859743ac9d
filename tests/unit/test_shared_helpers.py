"""Helpers shared across the project: the installed-package probe and the JSON hash."""

from __future__ import annotations

import hashlib

import numpy

from resources.packages import installed_package_dir
from resources.storage import json_sha256


def test_an_installed_package_is_found_without_importing_it() -> None:
    found = installed_package_dir("numpy")
    assert found is not None and (found / "__init__.py").samefile(numpy.__file__)


def test_a_missing_package_a_plain_module_and_a_bad_name_are_not_found() -> None:
    assert installed_package_dir("no_such_package_for_this_test") is None
    assert installed_package_dir("math") is None  # a module, not a package folder
    assert installed_package_dir("no_such_parent.child") is None


def test_the_json_hash_ignores_key_order_and_sees_every_value() -> None:
    payload = {"b": [1, 2.5, "x"], "a": {"z": None, "y": True}}
    expected = hashlib.sha256(b'{"a": {"y": true, "z": null}, "b": [1, 2.5, "x"]}').hexdigest()
    assert json_sha256(payload) == expected
    assert json_sha256({"a": {"y": True, "z": None}, "b": [1, 2.5, "x"]}) == expected
    assert json_sha256({**payload, "b": [1, 2.5, "y"]}) != expected
