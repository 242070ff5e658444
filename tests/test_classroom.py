"""classroom.py: an assignment of two small parts made, graded (alone and whole), solved; three
parts told apart (correct, subtly wrong, stubbed); a part that no test catches is refused;
every part of the table still names real functions."""
import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

import classroom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = "tests/test_model.py"     # both parts below are graded by this file alone: fast


def run(args, cwd, script_dir=None):
    return subprocess.run([sys.executable, os.path.join(script_dir or cwd, "classroom.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def assignment(tmp_path_factory):
    base = tmp_path_factory.mktemp("classroom")
    out, solutions = base / "hw", base / "solutions"
    done = run(["make", "rmsnorm", "sampling", "--tests", TESTS, "--out", str(out),
                "--solutions", str(solutions)], ROOT)
    assert done.returncode == 0, done.stderr
    return out, solutions, json.load(open(out / "classroom.json"))


def functions_of(path):
    """{qualified name: (signature dump, docstring, source)} of every function in a file."""
    source = open(path).read()
    found = {}

    def visit(node, prefix):
        for x in node.body:
            if isinstance(x, ast.ClassDef):
                visit(x, prefix + x.name + ".")
            elif isinstance(x, ast.FunctionDef):
                found[prefix + x.name] = (ast.dump(x.args), ast.get_docstring(x),
                                          ast.get_source_segment(source, x))
    visit(ast.parse(source), "")
    return found


def test_stubbed_functions_raise_and_the_rest_is_identical(assignment):
    out, _, _ = assignment
    ours, theirs = functions_of(os.path.join(ROOT, "model.py")), functions_of(out / "model.py")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name][:2] == theirs[name][:2], name           # signature and docstring kept
        stubbed = name in ("RMSNorm.forward", "sample")
        assert (ours[name][2] != theirs[name][2]) == stubbed, name
    assert "raise NotImplementedError('rmsnorm: " in theirs["RMSNorm.forward"][2]
    for f in ("tokenizer.py", "quietstar.py", "tests/test_model.py", "tests/conftest.py"):
        assert open(os.path.join(ROOT, f)).read() == open(out / f).read(), f
    # the answers stay with the teacher: no slow loop, no written-out formula in the tests
    assert not any(os.path.exists(out / f) for f in classroom.ANSWER_FILES)
    for f in os.listdir(out / "tests"):
        text = open(out / "tests" / f).read() if f.endswith(".py") else ""
        assert not any(s in text for s in ("advantage.clamp(min=0)", "def loss_by_loop", "** (-2 * i")), f
    probe = ("import torch, model\n"
             "for call in (lambda: model.RMSNorm(4, 1e-5)(torch.ones(4)), "
             "lambda: model.sample(torch.zeros(1, 3))):\n"
             "    try: call()\n"
             "    except NotImplementedError as e: print(str(e).split(':')[0])\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=out, capture_output=True, text=True)
    assert done.stdout.split() == ["rmsnorm", "sampling"], done.stderr


def test_mapping_names_the_tests_that_use_each_part(assignment):
    _, _, record = assignment
    tests = {p["name"]: {t.split("::")[1] for t in p["tests"]} for p in record["parts"]}
    assert [p["name"] for p in record["parts"]] == ["rmsnorm", "sampling"]
    assert {"test_logits_equal_transformers[hf-layout]", "test_kv_cache_decoding_equals_full_recompute",
            "test_left_padded_batch_equals_transformers"} <= tests["rmsnorm"]
    assert tests["sampling"] == {"test_sample_top_k_and_top_p", "test_generate_stops_at_eos",
                                 "test_generate_is_deterministic_and_batch_independent"}
    for untouched in ("test_sample_top_k_and_top_p", "test_presets", "test_rope_keeps_lengths_and_makes_scores_depend_on_distance_only"):
        assert untouched not in tests["rmsnorm"]
    assert all(t.startswith(TESTS + "::") for p in record["parts"] for t in p["tests"])


def test_grade_fails_exactly_the_mapped_tests_then_full_marks_when_solved(assignment):
    out, solutions, record = assignment
    graded = {t for p in record["parts"] for t in p["tests"]}
    everything = classroom.run_tests(str(out), [TESTS])           # the whole file, graded or not
    assert {t for t, (ok, _) in everything.items() if not ok} == graded

    # rmsnorm solved, sampling not. Alone (the teacher's grade, other parts on the reference):
    # rmsnorm full marks, sampling none. Whole (all the student's code): rmsnorm fails the
    # tests that need sampling too (generation), each marked as another part's failure
    assert run(["solve", "rmsnorm", "--solutions", str(solutions)], out).returncode == 0
    done = run(["grade", "--json", "--solutions", str(solutions)], out)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    rmsnorm, sampling = (set(p["tests"]) for p in record["parts"])
    r, s = report["parts"]
    assert r["alone"]["failing"] == [] and r["alone"]["points"] == 10
    assert {f["test"] for f in r["whole"]["failing"]} == rmsnorm & sampling != set()
    assert all(f["from_other_part"] and f["other_part"] == "sampling" for f in r["whole"]["failing"])
    assert r["whole"]["points"] == round(10 * len(rmsnorm - sampling) / len(rmsnorm), 1)
    for kind in ("alone", "whole"):
        assert {f["test"] for f in s[kind]["failing"]} == sampling and s[kind]["points"] == 0
        assert all(f["message"].startswith("NotImplementedError: sampling: sample:") and
                   not f["from_other_part"] for f in s["whole"]["failing"])
    assert report["max_points"] == 20
    without = json.loads(run(["grade", "--json"], out).stdout)   # the student's own grade
    assert "alone" not in without and without["whole"] == report["whole"]
    assert [f["other_part"] for f in without["parts"][0]["whole"]["failing"]] == \
        ["sampling"] * len(rmsnorm & sampling)

    assert run(["solve", "sampling", "--solutions", str(solutions)], out).returncode == 0
    done = run(["grade", "--solutions", str(solutions)], out)
    assert done.returncode == 0, done.stdout
    n = sum(len(p["tests"]) for p in record["parts"])          # a test graded twice counts twice
    assert done.stdout.splitlines()[-1].split()[1:] == [f"{n}/{n}", "20.0", f"{n}/{n}", "20.0", "20"]
    assert open(out / "model.py").read() == open(os.path.join(ROOT, "model.py")).read()
    # the handout's last exercise: the default run, on the student's (here: restored) code
    done = subprocess.run([sys.executable, "train.py", "--max_steps=1", "--final_eval_problems=20",
                           "--thought_interval=0", "--device=cpu", f"--out_dir={out / 'run'}"],
                          cwd=out, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "thinking earned: " in done.stdout, done.stderr[-2000:]


# the three-part scenario: one part correct, one subtly wrong, one left stubbed
# part: (file, the right line, the subtly wrong one, what the message must name). CI runs the
# first; `python -m pytest --runslow` all three.
BUGS = {"missing clamp": ("reinforce", "quietstar.py", "advantage = advantage.clamp(min=0)", "advantage = advantage",
                          "advantage with positive_advantage_only (the negative ones must become 0): got [["),
        "advantage sign": ("reinforce", "quietstar.py", "(per_example - per_example.mean(1, keepdim=True))",
                           "(per_example.mean(1, keepdim=True) - per_example)",
                           "advantage (reward minus the mean reward of the position's thoughts): got [["),
        "rotary frequency": ("rope", "model.py", "torch.arange(0, head_dim, 2, device=positions.device).float()",
                             "torch.arange(0, head_dim // 2, device=positions.device).float()",
                             "rotation angle of each pair at position 2 (atan2(sin, cos)): got [")}


@pytest.fixture(scope="module")
def three_parts(tmp_path_factory):
    base = tmp_path_factory.mktemp("three")
    done = run(["make", "rope", "reinforce", "mixing_head", "--tests", "tests/test_parts.py",
                "--out", str(base / "hw"), "--solutions", str(base / "solutions"), "--points", "rope=5"], ROOT)
    assert done.returncode == 0, done.stderr
    return base / "hw", base / "solutions"


@pytest.mark.parametrize("bug", [b if i == 0 else pytest.param(b, marks=pytest.mark.slow)
                                 for i, b in enumerate(BUGS)])
def test_correct_wrong_and_stubbed_parts_are_told_apart(three_parts, tmp_path, bug):
    out, solutions = tmp_path / "hw", three_parts[1]
    shutil.copytree(three_parts[0], out)
    assert run(["solve", "rope", "reinforce", "--solutions", str(solutions)], out).returncode == 0
    wrong_part, file, right, wrong, quantity = BUGS[bug]
    correct_part = ({"rope", "reinforce"} - {wrong_part}).pop()
    source = open(out / file).read()
    assert source.count(right) == 1
    open(out / file, "w").write(source.replace(right, wrong))
    done = run(["grade", "--solutions", str(solutions)], out)
    assert done.returncode == 1
    rows = {line.split()[0]: line.split()[1:4] for line in done.stdout.splitlines()[2:5]}
    passed, total = map(int, rows[correct_part][0].split("/"))
    assert passed == total and rows[correct_part][2] == f"{total}/{total}", done.stdout   # correct: 100%
    assert rows["mixing_head"][:2] == ["0/1", "0.0"]                 # stubbed: 0%
    passed, total = map(int, rows[wrong_part][0].split("/"))
    assert passed / total < 0.5, done.stdout                          # wrong: < 50%
    assert f"{wrong_part}: " in done.stdout and quantity in done.stdout, done.stdout   # names the wrong quantity


def test_a_part_no_test_catches_is_refused(tmp_path):
    done = run(["make", "model.Transformer.flops_per_token", "--tests", "tests/test_tokenizer.py",
                "--out", str(tmp_path / "hw")], ROOT)
    assert done.returncode == 2 and "cannot be graded" in done.stderr, done.stderr
    assert not (tmp_path / "hw").exists()


def test_clear_errors(tmp_path):
    for args, expected in [(["make", "model.no_such_function"], "model.py has no no_such_function"),
                           (["make", "nonsense"], "nonsense: not a part"),
                           (["make", "reinforse"], "reinforse: not a part; did you mean reinforce?"),
                           (["make", "model.KVCache.__init__"], "has no docstring"),
                           (["make", "rope", "--solutions", str(tmp_path / "hw" / "s")], "must be outside")]:
        done = run(args + ["--out", str(tmp_path / "hw")], ROOT)
        assert done.returncode == 2 and expected in done.stderr, (args, done.stderr)
        assert not (tmp_path / "hw").exists()
    done = run(["grade"], str(tmp_path), script_dir=ROOT)           # not an assignment folder
    assert done.returncode == 2 and "classroom.json not found" in done.stderr


def test_every_part_names_functions_that_exist():
    """The code under the parts changes; a renamed function must fail here, not in a classroom."""
    listed = subprocess.run([sys.executable, "classroom.py", "list"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    assert [line.split()[1] for line in listed.splitlines() if line[:3].strip().rstrip(".").isdigit()] == \
        [p[0] for p in classroom.PARTS]
    for name, *_ in classroom.PARTS:
        for f in classroom.find_part(name)["functions"]:
            classroom.body_lines(*classroom.locate(ROOT, f))
