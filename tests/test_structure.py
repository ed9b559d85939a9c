"""The house rules that keep the layout readable, checked on the source and on a built wheel:
stages import only lower stages, no module reaches for another's private names, the kernels
install as spt_fast.kernels only (never as the unrelated top-level `kernels`), CLI defaults come
from the config dataclasses, and a config handed to a function is never changed."""
import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "spt_fast"
# Lower number = lower stage; a module may import its own stage or a lower one.
STAGES = {"errors": 0, "utils": 0, "testing": 0, "kernels": 0, "data": 1, "model": 2, "training": 3,
          "generation": 4, "serving": 5, "evaluation": 5, "benchmarks": 6, "cli": 7, "__main__": 7}


def library_files():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
    assert len(files) > 30
    return files


def stage_of(path: Path) -> tuple[str, int]:
    rel = path.relative_to(ROOT).parts
    name = "kernels" if rel[0] == "kernels" else rel[1].removesuffix(".py")
    return name, STAGES[name] if name != "__init__" else 0


def imported_stages(path: Path):
    """(line, imported stage name, imported names) for every spt_fast import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT)
    package = ["spt_fast", *rel.parts[1:-1]] if rel.parts[0] == "spt_fast" else ["spt_fast", "kernels"]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "spt_fast":
                base = node.module.split(".")
            else:
                continue
            target = base[1] if len(base) > 1 else (node.names[0].name if node.names else "")
            yield node.lineno, target, [a.name for a in node.names]


def test_every_file_is_in_a_known_stage():
    for path in library_files():
        stage_of(path)  # KeyError names a module outside the stages


def test_lower_stages_never_import_higher_ones():
    bad = []
    for path in library_files():
        name, level = stage_of(path)
        for line, target, _ in imported_stages(path):
            if target in STAGES and STAGES[target] > level:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({name}) imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_names_imported_across_modules():
    bad = []
    for path in library_files():
        for line, _, names in imported_stages(path):
            bad += [f"{path.relative_to(ROOT)}:{line} imports {n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_every_stage_folder_explains_itself():
    for folder in [p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"]:
        init = folder / "__init__.py"
        assert init.is_file(), folder
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init} needs a docstring saying what the stage holds"


def _from_repo_root(code: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_kernels_from_the_repo_root_never_pass_for_the_kernels_package():
    # Python started in the repo root sees kernels/ as a top-level package. transformers (>= 5.25
    # depends on the unrelated `kernels` package and imports from it) and bitsandbytes must get
    # that package when it is installed, and "not installed" when it is not: never ours.
    code = (
        "import importlib.metadata, os\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "try:\n"
        "    importlib.metadata.version('kernels'); real = True\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    real = False\n"
        "assert is_kernels_available() == real, (is_kernels_available(), real)\n"
        "import kernels\n"
        "where = getattr(kernels, '__file__', None)\n"
        "if real:\n"
        "    assert where and not where.startswith(os.getcwd()), where\n"
        "    from kernels import get_kernel\n"
        "else:\n"
        "    assert where is None and not [n for n in vars(kernels) if not n.startswith('__')]\n"
        "    try:\n"
        "        from kernels import get_kernel\n"
        "        raise SystemExit('get_kernel importable')\n"
        "    except ImportError:\n"
        "        pass\n"
        "import spt_fast.kernels.retrieval as r\n"
        "assert r.__file__.endswith('kernels/retrieval.py'), r.__file__\n"
        "print('ok')\n"
    )
    out = _from_repo_root(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_an_installed_kernels_package_takes_the_place_of_ours(tmp_path):
    # Whatever this venv holds: a `kernels` package later on sys.path is what `import kernels`
    # gives in the repo root, and our modules stay reachable as spt_fast.kernels.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARK = 'the other package'\n")
    code = ("import kernels, spt_fast.kernels.retrieval as r\n"
            "print(kernels.MARK, r.__name__)\n")
    out = _from_repo_root(code, PYTHONPATH=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "the other package spt_fast.kernels.retrieval", out.stderr[-2000:]


def test_wheel_holds_every_package_and_no_top_level_kernels(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "Could not find a version" in out.stderr:
        pytest.skip("no build backend reachable for an isolated wheel build")
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("spt_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"spt_fast/{p.relative_to(PACKAGE)}" for p in PACKAGE.rglob("*.py")}
    want |= {f"spt_fast/{p.relative_to(PACKAGE)}" for p in PACKAGE.rglob("*.c")}  # compiled at first use
    want |= {f"spt_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert want <= names, sorted(want - names)
    assert not [n for n in names if n.startswith("kernels/")]


def test_cli_defaults_come_from_the_configs():
    from spt_fast.cli import build_parser
    from spt_fast.cli.demo import DemoConfig
    from spt_fast.evaluation.study import StudyConfig
    from spt_fast.generation.decoding import GenConfig
    from spt_fast.model.spt import SPTConfig
    from spt_fast.training.trainer import TrainConfig

    parser = build_parser()
    a = parser.parse_args(["train"])
    s, t = SPTConfig(), TrainConfig()
    for flag, want in [("num_prompts", s.num_prompts), ("prompt_len", s.prompt_len), ("layout", s.layout),
                       ("init", s.init), ("max_len", s.max_len), ("lambda_sel", s.lambda_sel),
                       ("lambda_ctr", s.lambda_ctr), ("lr", t.lr), ("retriever_lr", t.retriever_lr),
                       ("batch_size", t.batch_size), ("max_steps", t.max_steps), ("dtype", t.dtype),
                       ("save_every", t.save_every), ("output_dir", t.output_dir), ("model", t.model)]:
        assert getattr(a, flag) == want, flag
    g = GenConfig()
    a = parser.parse_args(["chat", "--checkpoint", "x"])
    assert (a.max_new_tokens, a.temperature, a.top_p, a.selection_noise) == \
        (g.max_new_tokens, g.temperature, g.top_p, g.selection_noise)
    a, d = parser.parse_args(["demo"]), DemoConfig()
    assert (a.max_steps, a.lr, a.retriever_lr, a.max_len, a.layout) == (d.max_steps, d.lr, d.retriever_lr,
                                                                        d.max_len, d.layout)
    a, st = parser.parse_args(["study"]), StudyConfig()
    assert (a.steps, a.seeds, a.lr, a.eval_samples) == (st.steps, st.seeds, st.lr, st.eval_samples)


def test_configs_handed_over_are_not_changed(char_tok):
    from spt_fast.generation.decoding import GenConfig
    from spt_fast.model.build import build_spt_model
    from spt_fast.model.spt import SPTConfig
    from spt_fast.testing import tiny_llama, tiny_opt

    cfg = SPTConfig(num_prompts=2, prompt_len=2, layout="auto")
    assert build_spt_model(tiny_llama(), cfg).config.layout == "shared"
    with pytest.warns(UserWarning, match="falling back"):
        assert build_spt_model(tiny_opt(), cfg).config.layout == "prefix"
    assert cfg.layout == "auto"
    base = GenConfig()
    built = GenConfig.build(base, stops="\n", max_new_tokens=3)
    assert built.stops == ("\n",) and base.stops != ("\n",) and base.max_new_tokens == 32
    assert built.validate(4) is built and built.stops == ("\n",)
