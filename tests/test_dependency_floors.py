"""constraints/minimum.txt pins exactly the floors pyproject.toml declares (CI's `make test-min`
installs it and runs the quick tests), so a raised floor cannot drift from what CI checks."""

import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_minimum_constraints_equal_the_declared_floors():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    floors = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,]*)(,.*)?", dep)
        if m:
            floors[m.group(1).lower()] = m.group(2)
    pins = {}
    with open(os.path.join(ROOT, "constraints", "minimum.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[name.lower()] = version
    assert pins and set(pins) <= set(floors), set(pins) - set(floors)
    for name, version in pins.items():
        declared = floors[name].split(".")
        pinned = version.split(".")
        assert pinned[:len(declared)] == declared and set(pinned[len(declared):]) <= {"0"}, (name, version, floors[name])
