"""What an installed wheel holds: the version and the licence."""
import configparser
import hashlib
import os

import pytest

import vitslim
from vitslim.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_cfg():
    c = configparser.ConfigParser()
    c.read(os.path.join(ROOT, "setup.cfg"))
    return c


def test_version_flag_prints_the_packages_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"vitslim {vitslim.__version__}\n"


def test_setup_cfg_takes_its_version_from_the_package():
    from setuptools.config.setupcfg import read_configuration
    assert _setup_cfg()["metadata"]["version"].strip() == "attr: vitslim.__version__"
    meta = read_configuration(os.path.join(ROOT, "setup.cfg"))["metadata"]
    assert meta["version"] == vitslim.__version__


def test_the_license_file_is_the_full_apache_2_text():
    c = _setup_cfg()["metadata"]
    assert c["license"] == "Apache-2.0" and c["license_files"].split() == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE"), "rb") as f:
        text = f.read()
    # https://www.apache.org/licenses/LICENSE-2.0.txt, unmodified
    assert hashlib.sha256(text).hexdigest() == "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"

