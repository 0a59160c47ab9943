"""``--arch module.path:factory`` and ``--arch path/to/file.py:factory``: your own code builds
the model, the checkpoint is a state_dict; every way that fails is exit 2 with one line saying
what to fix, and a checkpoint never makes slimdeploy import code on its own."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from slimdeploy.errors import ArchitectureError, SlimDeployError, StateDictMismatchError
from slimdeploy.loading import Preprocessing, is_factory_spec, load_checkpoint, save_checkpoint
from tests.conftest import REPO, assert_one_line_error, run_cli
from tests.own_models import GatedNet, gated_net, initialised

FACTORY_FILE = '''
from tests.own_models import gated_net, GatedNet

def build(controlled=False):
    return gated_net(controlled)

def returns_a_number():
    return 3

def raises(width=4):
    raise ValueError(f"width {width} is odd")

NOT_CALLABLE = 7
'''


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY_FILE)
    return path


@pytest.fixture
def state_dict_file(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(initialised(gated_net()).state_dict(), path)
    return path


def test_factory_specs_are_told_from_registered_names() -> None:
    assert is_factory_spec("pkg.models:build") and is_factory_spec("examples/gated.py:build")
    assert is_factory_spec("C:\\work\\m.py:build")  # the last colon separates the factory
    assert not is_factory_spec("skipnet_cifar10_feedforward_38") and not is_factory_spec("m.py:")
    assert not is_factory_spec(None)


def test_a_file_factory_builds_the_model_and_loads_the_state_dict(factory_file: Path, state_dict_file: Path) -> None:
    spec = f"{factory_file}:build"
    loaded = load_checkpoint(state_dict_file, arch=spec)
    assert isinstance(loaded.module, GatedNet) and not loaded.module.training
    assert (loaded.arch, loaded.arch_args, loaded.preprocessing.input_size) == (spec, {}, (3, 16, 16))
    expected = torch.load(state_dict_file, weights_only=True)
    assert all(torch.equal(value, expected[key]) for key, value in loaded.module.state_dict().items())
    assert any("your code" in note for note in loaded.notes)
    again = load_checkpoint(state_dict_file, arch=spec)  # the file is imported once per process
    assert type(again.module) is type(loaded.module)


def test_a_module_factory_and_the_checkpoints_own_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(FACTORY_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "userpkg.nets:build"
    model = initialised(gated_net(controlled=True))
    checkpoint = tmp_path / "controlled.pt"
    prep = Preprocessing((3, 16, 16), (0.3,) * 3, (0.4,) * 3)
    save_checkpoint(checkpoint, model, spec, {"controlled": True}, prep, {"dataset": "digits"})
    loaded = load_checkpoint(checkpoint, arch=spec)
    assert loaded.arch_args == {"controlled": True} and hasattr(loaded.module, "controller")
    assert loaded.preprocessing == prep and loaded.meta == {"dataset": "digits"}
    # The checkpoint names the factory, but slimdeploy imports code only where the caller names it.
    with pytest.raises(ArchitectureError, match=r"built by user code \(userpkg.nets:build\).*Fix: pass --arch userpkg.nets:build"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize(("spec", "fragments"), [
    ("{file}:nowhere", ["has no 'nowhere'", "it defines ['build', 'raises', 'returns_a_number']"]),
    ("{file}:NOT_CALLABLE", ["'NOT_CALLABLE'", "is a int, not callable"]),
    ("{file}:returns_a_number", ["returned a int, not an nn.Module"]),
    ("{file}:raises", ["raised ValueError: width 4 is odd", "--arch-args"]),
    ("{dir}/missing.py:build", ["no file", "missing.py"]),
    ("no_such_package_here.models:build", ["cannot import 'no_such_package_here.models'", "ModuleNotFoundError",
                                           "path/to/file.py:build"]),
    ("not a module:build", ["is neither a module path nor a .py file"]),
])
def test_factory_errors_say_what_to_fix(factory_file: Path, state_dict_file: Path, spec: str, fragments: list[str]) -> None:
    spec = spec.format(file=factory_file, dir=factory_file.parent)
    with pytest.raises(ArchitectureError) as refused:
        load_checkpoint(state_dict_file, arch=spec)
    message = str(refused.value)
    assert refused.value.exit_code == 2 and "\n" not in message and "Fix:" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_keys_that_do_not_match_the_factorys_model(factory_file: Path, state_dict_file: Path) -> None:
    with pytest.raises(StateDictMismatchError, match=r"does not match architecture '.*:build'.*missing: controller"):
        load_checkpoint(state_dict_file, arch=f"{factory_file}:build", arch_args={"controlled": True})


def test_an_import_that_fails_is_refused(tmp_path: Path, state_dict_file: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(SlimDeployError, match=r"importing '.*broken.py' \(--arch .*\) failed: RuntimeError: no GPU here.*Fix:"):
        load_checkpoint(state_dict_file, arch=f"{broken}:build")


@pytest.mark.parametrize("case", ["syntax", "keys", "named_by_checkpoint"])
@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, factory_file: Path, state_dict_file: Path, case: str) -> None:
    if case == "syntax":
        bad = tmp_path / "bad.py"
        bad.write_text(textwrap.dedent("def build(:\n    pass\n"))
        args, fragments = [str(state_dict_file), "--arch", f"{bad}:build"], ["importing", "SyntaxError"]
    elif case == "keys":
        args = [str(state_dict_file), "--arch", f"{factory_file}:build", "--arch-args", '{"controlled": true}']
        fragments = ["does not match architecture", "missing"]
    else:
        checkpoint = tmp_path / "named.pt"
        save_checkpoint(checkpoint, initialised(gated_net()), f"{factory_file}:build", {}, Preprocessing((3, 16, 16), (0.3,) * 3, (0.4,) * 3))
        args, fragments = [str(checkpoint)], ["built by user code", f"pass --arch {factory_file}:build"]
    result = run_cli("export", *args, "--out", str(tmp_path / "bundle"), cwd=REPO)
    assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "bundle").exists()
