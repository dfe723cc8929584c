"""Every Python code block of the README runs as written."""

import re
import shlex

import pytest
from conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_python_blocks():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    namespace = {}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)


def _bash_commands():
    """Every command of the README's bash blocks (continuation lines joined, comments and `...` dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for command in re.sub(r"(^|\s)#.*$", "", line).split(" && "):
                words = shlex.split(command)
                commands.append([w for w in words if w != "..."])
    return [c for c in commands if c]


def _parse(words):
    """Parse a README command's flags with the parser the command itself uses (nothing runs); None for commands
    that are not ours (pip, venv, pytest)."""
    from data2vec_aqc_hf import convert, evaluation, lm, transcription
    from data2vec_aqc_hf.cli import parse_args
    from data2vec_aqc_hf.finetuning import FinetuneArguments, TrainerOptions
    from data2vec_aqc_hf.pretraining import PretrainingArguments

    if words[:2] == ["accelerate", "launch"]:
        words = ["python"] + words[2:]
    parsers = {("python", "training/finetune.py"): lambda a: parse_args((FinetuneArguments, TrainerOptions), a),
               ("python", "training/pretrain.py"): lambda a: parse_args(PretrainingArguments, a),
               ("python", "training/evaluate_asr.py"): evaluation.build_parser().parse_args,
               ("python", "training/transcribe.py"): transcription.build_parser().parse_args,
               ("data2vec-aqc-transcribe",): transcription.build_parser().parse_args,
               ("data2vec-aqc-convert",): convert.build_parser().parse_args,
               ("python", "-m", "data2vec_aqc_hf.lm"): lm.build_parser().parse_args}
    for prefix, parse in parsers.items():
        if tuple(words[: len(prefix)]) == prefix:
            return parse(words[len(prefix):])
    return None


def test_every_readme_command_of_ours_parses_as_written(tmp_path, monkeypatch):
    """The README's shell commands: each flag exists, each value is valid, no two flags conflict (e.g. the
    Trainer's `--load_best_model_at_end` needs `--save_steps` a multiple of `--eval_steps`)."""
    monkeypatch.chdir(ROOT)  # commands name repo paths (configs/..., training/...)
    parsed = [words for words in _bash_commands() if _parse(words) is not None]
    names = {w[0] if w[0].startswith("data2vec-aqc") else " ".join(w[:2]) for w in parsed}
    assert {"python training/finetune.py", "accelerate launch", "data2vec-aqc-transcribe",
            "data2vec-aqc-convert", "python training/evaluate_asr.py", "python -m"} <= names, names


def _parsers():
    from data2vec_aqc_hf import convert, evaluation, lm, transcription

    return {"data2vec-aqc-transcribe": transcription.build_parser(), "data2vec-aqc-convert": convert.build_parser(),
            "training/evaluate_asr.py": evaluation.build_parser(), "python -m data2vec_aqc_hf.lm": lm.build_parser()}


@pytest.mark.parametrize("name", ["data2vec-aqc-transcribe", "data2vec-aqc-convert", "training/evaluate_asr.py",
                                  "python -m data2vec_aqc_hf.lm"])
def test_every_cli_flag_has_help_and_shows_its_default(name):
    parser = _parsers()[name]
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False):
            assert f"(default: {action.default})" in text, f"{name}: {action.option_strings} hides its default"


def test_every_flag_of_ours_in_the_training_scripts_has_help():
    """pretrain.py, finetune.py and the experiment: every field of our argument dataclasses has a help line (the
    HfArgumentParser shows the default with it)."""
    import dataclasses

    from data2vec_aqc_hf.experiment import ExperimentArguments
    from data2vec_aqc_hf.finetuning import FinetuneArguments
    from data2vec_aqc_hf.pretraining import PretrainingArguments

    for cls in (PretrainingArguments, FinetuneArguments, ExperimentArguments):
        missing = [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("help")]
        assert not missing, f"{cls.__name__}: no help for {missing}"


def test_finetune_help_tells_what_our_script_does_with_trainer_options():
    """Two TrainingArguments mean more in finetune.py than transformers' help says: `--resume_from_checkpoint`
    (used, and takes `latest`) and `--report_to` (tensorboard by default); their help says so."""
    from transformers import HfArgumentParser

    from data2vec_aqc_hf.finetuning import FinetuneArguments, TrainerOptions

    parser = HfArgumentParser((FinetuneArguments, TrainerOptions))
    helps = {a.dest: a.help for a in parser._actions}
    assert "'latest'" in helps["resume_from_checkpoint"] and "checkpoint-N" in helps["resume_from_checkpoint"]
    assert "Not directly used by Trainer" not in helps["resume_from_checkpoint"]
    assert "tensorboard" in helps["report_to"]
    help_text = parser.format_help()  # ours first, transformers' ~150 options after them in their own group
    text = help_text[help_text.index("\n\n"):]  # after the usage lines, which list every flag
    assert text.index("--train_manifest") < text.index("Trainer options (transformers.TrainingArguments)") \
        < text.index("--per_device_train_batch_size")


def test_a_built_wheel_carries_the_card_templates(tmp_path):
    """A non-editable install must find the model-card templates (they live in model_cards/, outside the package
    folder): the wheel holds them as data2vec_aqc_hf/model_card_templates/, and cards.find_template reads them
    from an unpacked copy of the wheel where the repository is not beside it."""
    import subprocess
    import sys
    import zipfile

    import shutil

    source = tmp_path / "source"  # a copy: the build writes build/ and egg-info next to setup.cfg
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info",
                                                                "__pycache__", "data", "docs", "tests"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                            "-w", str(tmp_path / "wheel")], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    templates = sorted(p.name for p in (ROOT / "model_cards").glob("*.md"))
    assert templates and sorted(p.name for p in (tmp_path / "site/data2vec_aqc_hf/model_card_templates").glob("*.md")) \
        == templates
    code = ("import data2vec_aqc_hf.cards as c, pathlib; p = c.find_template('finetuned.md'); "
            "assert 'model_card_templates' in str(p) and p.read_text().strip(), p; print(p)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")})
    assert run.returncode == 0, run.stderr[-3000:]
