"""
Classroom: any part of this repository becomes an assignment, graded part by part by the
tests that already hold the code to its references.

    python classroom.py list                                   # the parts, in reading order
    python classroom.py make rmsnorm rope --out hw1 --solutions hw1-solutions [--points rope=5]
    cd hw1 && python classroom.py grade [--json] [--part rope]  # the student: everything theirs
    python classroom.py grade --solutions ../hw1-solutions      # the teacher: each part alone too
    python classroom.py solve rope --solutions ../hw1-solutions # put a part's bodies back

`make` copies the git-tracked files into --out and replaces the body of every function of
the chosen parts by `raise NotImplementedError(...)`, keeping its signature and docstring
(the docstring is the specification). Which tests grade a part is derived, not written down:
the test files that import the part's module (at their top) run once on the original code,
traced to see which tests may call the part, and those run again with that part alone
stubbed; the tests that passed before and fail now are the part's tests. Tests that start a
process (train.py, the README's commands), tests over 5 s and the meta/fake-tensor files
(NOT_GRADING: they check devices and memory, never values) are not graded. A part that no test
catches is refused. The mapping is written to DIR/classroom.json, so `grade` only runs tests.
The slow reference loops the tests' stored numbers came from (ANSWER_FILES) are not handed out.
Any function with a docstring can be a part: `model.apply_rope`, `model.RMSNorm.forward`.

`grade` scores each part twice: "whole", on the student's code as it is, and with the
reference bodies (--solutions, kept outside the student's folder) "alone": the part's tests
run on a copy where every other part has its reference body, so a part's score depends on
that part only. Each failure is shown with its assertion and values, grouped per part.
"""

import argparse
import ast
import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

# The parts, in reading order: name, title, functions (module.qualified.name), what the
# student implements and learns, and where it comes from. Names are resolved when used, so
# a function that was renamed or moved gives a clear error here, not a wrong assignment.
PARTS = [
    ("rmsnorm", "RMSNorm", ["model.RMSNorm.forward"],
     "normalise each vector by its root mean square (in float32) and scale it by a learned weight",
     "Zhang & Sennrich 2019, Root Mean Square Layer Normalization (the RMSNorm formula)"),
    ("rope", "Rotary position embeddings", ["model.rope_cos_sin", "model.apply_rope"],
     "rotate each pair of dimensions by position x frequency, so that q.k depends on the distance only",
     "Su et al. 2021, RoFormer, Sec. 3.2 (the rotation of pairs) and 3.4.2 (computed efficiently)"),
    ("attention", "Grouped-query attention with a sliding window",
     ["model.attention_mask", "model.Attention.forward"],
     "causal attention where 4 query heads share one key/value head and a token sees at most "
     "`window` tokens, also through a KV cache and left padding",
     "Ainslie et al. 2023, GQA; Jiang et al. 2023, Mistral 7B, Sec. 2 Architectural details (sliding window attention)"),
    ("swiglu", "SwiGLU feed-forward", ["model.FeedForward.forward"],
     "the gated feed-forward layer: w2(silu(w1 x) * w3 x)",
     "Shazeer 2020, GLU Variants Improve Transformer (FFN_SwiGLU)"),
    ("kv_cache", "The KV cache", ["model.KVCache.update"],
     "keep every past key and value so that decoding one token costs one token, not a recompute",
     "README: decoding; tested against recomputing the whole sequence"),
    ("sampling", "Sampling: temperature, top-k, top-p", ["model.sample"],
     "turn logits into a token: greedy, temperature, top-k and nucleus (top-p) filtering",
     "Holtzman et al. 2020, The Curious Case of Neural Text Degeneration (nucleus sampling, top-p)"),
    ("qk_permutation", "The q/k permutation on loading", ["model.permute_for_rope"],
     "undo the reordering of Hugging Face's wq/wk rows (made for its rotate-half RoPE), and redo it on saving",
     "transformers' convert_mistral_weights_to_hf.py, permute(); model.py's docstring"),
    ("byte_fallback", "The tokenizer's byte fallback", ["tokenizer.build_ranks"],
     "translate SentencePiece's pieces into tiktoken ranks, with bytes for what no piece covers",
     "Kudo & Richardson 2018, SentencePiece (byte_fallback); tokenizer.py's docstring"),
    ("thought_attention", "Thought attention", ["quietstar_ops.thought_attention"],
     "attention of every position's thought branch over the shared text and its own branch, "
     "one softmax over both, without the official L x L*M dense mask",
     "Quiet-STaR (Zelikman et al. 2024), Sec. 4.2 Parallel Generation"),
    ("parallel_thoughts", "Sampling thoughts in parallel", ["quietstar.QuietStar.sample_thoughts"],
     "sample a thought after every token at once: the text once, then one token per position per step",
     "Quiet-STaR, Sec. 4.2 Parallel Generation"),
    ("mixing_head", "The mixing head", ["quietstar.QuietStar._mix"],
     "interpolate the base and post-thought hidden states with a learned weight w",
     "Quiet-STaR, Sec. 4.3 \"Mixing\" (Residual) Heads (talk)"),
    ("talk_loss", "Talk loss and reward", ["quietstar.talk_loss_and_reward"],
     "the non-myopic loss over the next n_talk true tokens, and a thought's reward: how much "
     "likelier it made them",
     "Quiet-STaR, Sec. 4.4 Optimizing Rationale Generation: Non-myopic Scoring and "
     "Teacher-forcing, and the reward r_j of its Objective"),
    ("reinforce", "REINFORCE with a baseline", ["quietstar.reinforce_loss"],
     "the policy gradient on sampled thought tokens, with the mean reward of sibling thoughts "
     "as baseline",
     "Quiet-STaR, Sec. 4.4 Optimizing Rationale Generation: its Objective (the REINFORCE "
     "gradient, the baseline the mean reward of the position's rationales)"),
    ("thinking_generation", "Thinking generation", ["quietstar.QuietStar._think"],
     "think before each generated token with a throwaway branch over the text's KV cache",
     "Quiet-STaR, Algorithm 1 (think, then talk), run before each generated token"),
    ("grad_clip", "Gradient clipping", ["train.clip_gradients"],
     "scale all gradients so that their global norm is at most max_norm (summed in float64)",
     "Pascanu et al. 2013, On the difficulty of training RNNs, Sec. 3.2 (Scaling down the gradients)"),
]
MAX_TEST_SECONDS = 5   # a test slower than this on the original code is not graded (grading stays fast)
POINTS = 10            # a part's default worth; its points = its worth x passed / total (--points)
# minutes a student needs for a part (our estimate, for the handout; the teacher may change
# them with --minutes), and a hint that --no_hints leaves out
MINUTES = dict(rmsnorm=20, rope=45, attention=90, swiglu=15, kv_cache=30, sampling=45,
               qk_permutation=45, byte_fallback=60, thought_attention=120, parallel_thoughts=120,
               mixing_head=20, talk_loss=90, reinforce=45, thinking_generation=90, grad_clip=20)
HINTS = dict(
    rmsnorm="compute in float32 and cast back to the input's dtype at the end",
    rope="pairs are adjacent dimensions (2i, 2i+1), not the two halves; the angle of pair i at "
         "position p is p / theta^(2i/D)",
    attention="query head h uses key/value head h // (n_heads // n_kv_heads); the mask is causal "
              "AND within the window AND not padding",
    swiglu="three bias-free linear maps; silu(x) = x * sigmoid(x)",
    kv_cache="write in place at [start, start + T) and return everything up to start + T",
    sampling="filter the logits (set the rest to -inf) before the softmax; top-p keeps the "
             "smallest set whose probability reaches p, always at least one token",
    qk_permutation="view each head's rows as (2, D/2) and swap to (D/2, 2): halves -> pairs",
    byte_fallback="pieces <0xNN> are single bytes; every other piece's text uses U+2581 for a space",
    thought_attention="one softmax over the concatenated text and branch scores, so the two parts "
                      "share one normaliser",
    parallel_thoughts="the start-of-thought token first, then one token per position per step, "
                      "each branch attending to the text before it and to its own branch",
    mixing_head="self.mixing_head is already built: call it on the two states concatenated on the "
                "last dimension",
    talk_loss="a thought's reward is, summed over the next n_talk true tokens, the base "
              "cross-entropy minus the cross-entropy after thinking, detached (the mean over "
              "thoughts is reinforce's baseline, not part of the reward)",
    reinforce="the baseline is the mean reward of the same position's thoughts; with "
              "positive_advantage_only only thoughts better than the mean are reinforced",
    thinking_generation="the thought's keys and values are thrown away after each token: only "
                        "the text's stay in the cache",
    grad_clip="one norm over all parameters together; scale only when it exceeds max_norm")
# The section numbers in PARTS were checked against the papers' text (section titles and the
# papers' own cross-references, e.g. Quiet-STaR's "talk, Subsection 4.3"); where no text could be
# checked, a part names the paper and the formula, not a number.
MAPPING = "classroom.json"


class ClassroomError(Exception):
    """A mistake the user can fix; printed as one or two lines, no traceback."""


# -----------------------------------------------------------------------------
# parts and the functions they cover

def find_part(name, root=None):
    """A part of PARTS by name, or an ad-hoc part for a function name like model.apply_rope
    (its title is the name, its spec the docstring's first line; one without a docstring is
    refused: the student would have nothing to work from)."""
    for part_name, title, functions, learns, source in PARTS:
        if part_name == name:
            return dict(name=name, title=title, functions=functions, learns=learns, source=source)
    if "." not in name:
        close = difflib.get_close_matches(name, [p[0] for p in PARTS], n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ClassroomError(f"{name}: not a part; {hint}(known: {', '.join(p[0] for p in PARTS)}; "
                             f"or name a function as module.function, e.g. model.apply_rope)")
    doc = docstring(root or os.path.dirname(os.path.abspath(__file__)), name)
    if not doc:
        raise ClassroomError(f"{name}: has no docstring, so the student has no specification; "
                             f"write one first or choose a part from `list`")
    return dict(name=name, title=f"`{name}`", functions=[name], learns=doc.split("\n\n")[0]
                .replace("\n", " ").rstrip("."), source="")


def locate(root, qualified):
    """model.RMSNorm.forward -> (file, FunctionDef node) in the checkout at root."""
    parts = qualified.split(".")
    for n in range(len(parts) - 1, 0, -1):        # the longest prefix that is a .py file
        path = os.path.join(root, *parts[:n]) + ".py"
        if os.path.isfile(path):
            break
    else:
        raise ClassroomError(f"{qualified}: no module {parts[0]}.py in {root}")
    node = ast.parse(open(path).read())
    for name in parts[n:]:
        body = getattr(node, "body", [])
        matches = [x for x in body if isinstance(x, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.ClassDef)) and x.name == name]
        if not matches:
            raise ClassroomError(f"{qualified}: {os.path.relpath(path, root)} has no "
                                 f"{'.'.join(parts[n:])} (renamed? update PARTS in classroom.py)")
        node = matches[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise ClassroomError(f"{qualified}: is a class, not a function; name its methods")
    return path, node


def body_lines(path, node):
    """(first, last) 1-based lines of the body below the docstring, comments included."""
    body, lines = node.body, open(path).read().splitlines()
    has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        and isinstance(body[0].value.value, str)
    if has_doc and len(body) == 1:
        raise ClassroomError(f"{node.name} in {path}: has only a docstring, nothing to implement")
    first_stmt = body[1] if has_doc else body[0]
    first = min([first_stmt.lineno] + [d.lineno for d in getattr(first_stmt, "decorator_list", [])])
    if first == node.lineno:
        raise ClassroomError(f"{node.name} in {path}: body on the def line; cannot stub it")
    stop = body[0].end_lineno if has_doc else node.lineno
    while first - 1 > stop and lines[first - 2].strip().startswith("#"):
        first -= 1                                 # comments above the first statement go too
    return first, node.end_lineno


def docstring(root, qualified):
    return ast.get_docstring(locate(root, qualified)[1]) or ""


def replace_bodies(root, new_bodies):
    """new_bodies: {qualified name: function(indent) -> body text}. Rewrites files in place."""
    by_file = {}
    for qualified, make_body in new_bodies.items():
        path, node = locate(root, qualified)
        first, last = body_lines(path, node)
        indent = node.body[-1].col_offset
        by_file.setdefault(path, []).append((first, last, make_body(" " * indent)))
    for path, edits in by_file.items():
        lines = open(path).read().splitlines(keepends=True)
        for first, last, text in sorted(edits, reverse=True):   # bottom up: line numbers hold
            lines[first - 1:last] = [text if text.endswith("\n") else text + "\n"]
        open(path, "w").write("".join(lines))


def original_bodies(root, functions):
    """{qualified name: the body's source text, as written}."""
    out = {}
    for qualified in functions:
        path, node = locate(root, qualified)
        first, last = body_lines(path, node)
        out[qualified] = "".join(open(path).read().splitlines(keepends=True)[first - 1:last])
    return out


def stub(root, part, hints=True):
    what = part["learns"] if hints and part["learns"] else "see the docstring"
    replace_bodies(root, {f: (lambda indent, f=f: f"{indent}raise NotImplementedError("
                              f"{part['name'] + ': ' + f.split('.', 1)[1] + ': ' + what!r})")
                          for f in part["functions"]})


# -----------------------------------------------------------------------------
# running tests

def tracked_files(root):
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise ClassroomError(f"{root}: make needs a git checkout (it copies the tracked files)")
    files = [f for f in out.stdout.decode().split("\0") if f]
    return files + ["classroom.py"] * ("classroom.py" not in files)   # grade runs from the copy


def copy_tree(root, files, dest):
    for f in files:
        if os.path.isfile(os.path.join(root, f)):      # tracked but deleted: skip
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(root, f), os.path.join(dest, f))


def top_imports(path):
    """Names of the modules a Python file imports at its top level."""
    tree = ast.parse(open(path).read())
    imported = {a.name.split(".")[0] for x in tree.body if isinstance(x, ast.Import) for a in x.names}
    return imported | {x.module.split(".")[0] for x in tree.body if isinstance(x, ast.ImportFrom) and x.module}


# Test files that check where tensors live and how much memory a step takes (meta device,
# fake tensors), never a value: wrong code passes them, so by default they grade nothing
# (--tests may still name them).
NOT_GRADING = ("tests/test_device.py", "tests/test_estimate.py")
# The slow loops that the stored numbers in the tests came from, the tests that hold the code
# to them, and this tool's own test (it writes out parts' right lines to break them): they are
# the answers (the loss written out, the clamp, the rotary angles), so make leaves them out of
# the student's folder; the student's tests compare with the stored numbers and state
# properties. The repository's own suite still runs them.
ANSWER_FILES = ("tests/references.py", "tests/test_references.py", "tests/test_classroom.py")


def test_files_for(root, modules):
    """tests/test_*.py files that import one of modules at their top level (not NOT_GRADING,
    not ANSWER_FILES)."""
    modules = set(modules)
    found = []
    for name in sorted(os.listdir(os.path.join(root, "tests"))):
        path = f"tests/{name}"
        if name.startswith("test_") and name.endswith(".py") and path not in NOT_GRADING + ANSWER_FILES \
                and top_imports(os.path.join(root, path)) & modules:
            found.append(path)
    return found


def run_tests(tree, args, timeout=3600, env=None):
    """Run pytest in tree on args (files or test ids) -> {test id: (passed, message)}; the
    message of a failure is its assertion with the values (pytest's rewriting) and where."""
    fd, xml = tempfile.mkstemp(suffix=".xml")
    os.close(fd)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
           "--tb=short", "--continue-on-collection-errors", f"--junitxml={xml}", *args]
    try:
        done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout,
                              env=env)
        uncollected = {os.path.relpath(line.split("found no collectors for ")[1].split("::")[0], os.path.abspath(tree))
                       for line in (done.stdout + done.stderr).splitlines() if "found no collectors for " in line}
        if done.returncode == 4 and uncollected:     # a file that fails to import has no test ids
            ids = [a for a in args if a.split("::")[0] not in uncollected] + sorted(uncollected)
            return run_tests(tree, ids, timeout, env)   # the whole file: its import error, fast
        if done.returncode not in (0, 1) or not os.path.getsize(xml):   # 1: some tests failed
            raise ClassroomError(f"pytest {' '.join(args)[:200]} in {tree} stopped (exit "
                                 f"{done.returncode}): {(done.stdout + done.stderr).strip()[-500:]}")
        return read_junit(xml)
    except subprocess.TimeoutExpired:
        raise ClassroomError(f"pytest {' '.join(args)[:200]} in {tree} ran longer than {timeout} s")
    finally:
        os.remove(xml)


def failure_message(text, fallback, max_lines=5):
    """The `E` lines of a --tb=short failure (the assertion and its values), at most max_lines
    of 300 characters, then the test's line where it failed."""
    lines = text.splitlines()
    e_lines = [line[1:].strip() for line in lines if line.startswith("E ")]
    noise = ("<built-in", "<function", "<bound method")   # pytest's "where f = <function ...>"
    e_lines = [x if len(x) <= 300 else x[:297] + "..." for x in e_lines
               if x and x != "assert False" and not (x.startswith("+") and any(n in x for n in noise))][:max_lines] \
        or [fallback.split("\n")[0][:300]]
    where = [line.split(": in ")[0] for line in lines if line.startswith("tests/") and ": in " in line]
    return "\n".join(e_lines + ([f"at {where[0]}"] if where else []))     # the test's own line


class Results(dict):
    """{test id: (passed, message)}, and .seconds: {test id: seconds it took}."""


def read_junit(xml):
    results, seconds = Results(), {}
    for case in ET.parse(xml).iter("testcase"):
        file, name = case.get("file"), case.get("name")
        if not case.get("classname"):  # a file that failed to import: all its tests fail
            file, name = file or name.replace(".", "/") + ".py", "<collection>"
        rest = case.get("classname", "")[len(file[:-3].replace("/", ".")) + 1:]
        test_id = "::".join([file] + ([rest] if rest else []) + [name])
        if case.find("skipped") is not None:
            continue
        bad = [c for c in case if c.tag in ("failure", "error")]
        message = "" if name != "<collection>" else "the test file failed to import: "
        if bad:
            message += failure_message(bad[0].text or "", bad[0].get("message") or "")
        results[test_id] = (not bad and results.get(test_id, (True,))[0], message)
        seconds[test_id] = seconds.get(test_id, 0.0) + float(case.get("time") or 0)
    results.seconds = seconds
    return results


def outcome(results, test_id):
    """(passed, message) of a test; a test of a file that failed to import failed."""
    broken = results.get(test_id.split("::")[0] + "::<collection>")
    return broken or results.get(test_id, (False, "did not run"))


def derive_mapping(root, parts, test_files, jobs):
    """For each part, the tests that pass on the original code and fail with it stubbed.
    The run on the original code also traces which tests call each part's functions (or use a
    fixture or collect a file that does), and skips the tests that start a process (not graded:
    slow, and they say no more than an exit status), so each stubbed copy runs only
    those tests: the others cannot fail there, and the mapping is the one that running every
    test on every copy would give, in a fraction of the time."""
    t0, files = time.time(), tracked_files(root)
    scratch = tempfile.mkdtemp(prefix="classroom-")
    try:
        ran = {p["name"]: test_files or test_files_for(root, sorted({f.split(".")[0] for f in p["functions"]}))
               for p in parts}
        all_files = sorted({f for fs in ran.values() for f in fs})
        base = os.path.join(scratch, "original")
        copy_tree(root, files, base)
        watched = sorted({f for p in parts for f in p["functions"]})
        # one torch thread per run when several run at once: spinning OpenMP threads of
        # parallel runs fight over the cores (only the speed changes: which tests fail does not)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs))))
        traces = [os.path.join(scratch, f"trace{i}.json") for i in range(len(all_files))]
        with ThreadPoolExecutor(jobs) as pool:
            order = sorted(range(len(all_files)), key=lambda i: all_files[i] != "tests/test_train.py")
            done = pool.map(lambda i: run_tests(base, ["-p", "classroom", all_files[i]], env=dict(
                env, CLASSROOM_TRACE=traces[i], CLASSROOM_WATCH=json.dumps(watched),
                PYTHONPATH=os.pathsep.join([base] + env.get("PYTHONPATH", "").split(os.pathsep)))), order)
            done = list(done)
            baseline = {k: v for results in done for k, v in results.items()}
            seconds = {k: v for results in done for k, v in results.seconds.items()}
        slow = sorted(t for t, s in seconds.items() if s > MAX_TEST_SECONDS and baseline.get(t, (False,))[0])
        for t in slow:                   # a grade of one part stays within a minute
            del baseline[t]
        t_original = time.time()
        trace = [json.load(open(t)) for t in traces]
        plans = []                                          # (part, tree, tests that may fail)
        for i, part in enumerate(parts):
            maybe = [t for t, (ok, _) in baseline.items() if ok and t.split("::")[0] in ran[part["name"]]
                     and may_call(trace, t, set(part["functions"]))]
            tree = os.path.join(scratch, str(i))
            if maybe:
                copy_tree(root, files, tree)
                stub(tree, part)
            plans.append((part, tree, maybe))
        with ThreadPoolExecutor(jobs) as pool:     # the longest first: the cores finish together
            longest = sorted(plans, key=lambda p: -sum(seconds.get(t, 0) for t in p[2]))
            done = dict(zip((p[0]["name"] for p in longest),
                            pool.map(lambda p: run_tests(p[1], p[2], env=env) if p[2] else {}, longest)))
            mapping = {part["name"]: [t for t in maybe if not outcome(done[part["name"]], t)[0]]
                       for part, _, maybe in plans}
        broken = sorted(t for t, (ok, _) in baseline.items() if not ok)
        print(f"ran {len(baseline) + len(slow)} tests on the original code in {t_original - t0:.0f} s, then "
              f"{sum(len(m) for _, _, m in plans)} on the stubbed copies in {time.time() - t_original:.0f} s")
        if slow:
            print(f"note: not graded, over {MAX_TEST_SECONDS} s each on the original code: {tests_word(len(slow))}, "
                  f"{', '.join(slow)}")
        return mapping, ran, broken
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def tests_word(n):
    return f"{n} test" + ("" if n == 1 else "s")


def may_call(traces, test_id, functions):
    """Whether a test might call one of functions: it, a fixture it uses, the collection of its
    file or anything unattributed called one. (Tests that start a process were skipped.)"""
    hit = functions
    file = test_id.split("::")[0]
    for trace in traces:
        calls = {k: set(v) for k, v in trace["calls"].items()}
        if hit & set(trace["unwatched"]) or hit & calls.get("global", set()):
            return True
        if test_id in trace["fixtures"] or file == trace["file"]:
            keys = [f"test:{test_id}", f"file:{file}"] + [f"fixture:{n}" for n in trace["fixtures"].get(test_id, [])]
            if any(hit & calls.get(k, set()) for k in keys) or test_id not in trace["fixtures"]:
                return True
    return False


# -----------------------------------------------------------------------------
# the tracing plugin: `pytest -p classroom` with CLASSROOM_TRACE and CLASSROOM_WATCH set

_trace = None


def _note(name):
    _trace["calls"].setdefault(_trace["where"], set()).add(name)


def _watch(qualified):
    """Replace the function by a wrapper that notes each call; False if it cannot be wrapped."""
    import functools
    import importlib
    import types
    parts = qualified.split(".")
    owner = importlib.import_module(parts[0])
    for name in parts[1:-1]:
        owner = getattr(owner, name)
    fn = vars(owner).get(parts[-1])
    if not isinstance(fn, types.FunctionType):
        return False

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _note(qualified)
        return fn(*args, **kwargs)
    setattr(owner, parts[-1], wrapper)
    for module in list(sys.modules.values()):       # names bound by `from model import f`
        names = getattr(module, "__dict__", None)
        for key in [k for k, v in names.items() if v is fn] if isinstance(names, dict) else []:
            setattr(module, key, wrapper)
    return True


def pytest_configure(config):
    global _trace
    if not os.environ.get("CLASSROOM_TRACE"):
        return
    _trace = dict(where="global", calls={}, fixtures={}, file=None, unwatched=[])
    _trace["unwatched"] = [q for q in json.loads(os.environ["CLASSROOM_WATCH"]) if not _watch(q)]
    popen_init = subprocess.Popen.__init__

    import pytest

    def traced_init(self, *args, **kwargs):
        if _trace["where"] != "global":      # not imports before the tests (torch starts some)
            # A test that starts a process (train.py, the README's commands) is not graded: it
            # takes seconds to minutes, and all it could say of a part is "exit status 1".
            self._child_created = False      # what Popen.__del__ looks at
            raise pytest.skip.Exception("classroom: starts a process, not graded", allow_module_level=True)
        popen_init(self, *args, **kwargs)
    subprocess.Popen.__init__ = traced_init

    class Fixtures:
        @pytest.hookimpl(hookwrapper=True)
        def pytest_fixture_setup(self, fixturedef):     # calls made while a fixture is made
            where, _trace["where"] = _trace["where"], f"fixture:{fixturedef.argname}"
            yield
            _trace["where"] = where
    config.pluginmanager.register(Fixtures())


def pytest_collectstart(collector):
    if _trace is not None and collector.nodeid.endswith(".py"):
        _trace["where"], _trace["file"] = f"file:{collector.nodeid}", collector.nodeid


def pytest_collection_modifyitems(items):
    if _trace is not None:
        _trace["fixtures"] = {item.nodeid: list(getattr(item, "fixturenames", [])) for item in items}
        _trace["where"] = "global"


def pytest_runtest_call(item):
    if _trace is not None:
        _trace["where"] = f"test:{item.nodeid}"


def pytest_runtest_teardown(item):
    if _trace is not None:
        _trace["where"] = f"test:{item.nodeid}"


def pytest_unconfigure(config):
    if _trace is not None:
        _trace["calls"] = {k: sorted(v) for k, v in _trace["calls"].items()}
        json.dump(_trace, open(os.environ["CLASSROOM_TRACE"], "w"))


# -----------------------------------------------------------------------------
# the commands

def cmd_list(args):
    for i, (name, title, functions, learns, source) in enumerate(PARTS, 1):
        print(f"{i:2d}. {name:<20} {title}\n    {', '.join(functions)}\n    {learns}")


def cmd_make(args):
    root = os.path.dirname(os.path.abspath(__file__))
    out = os.path.abspath(args.out)
    sol = os.path.abspath(args.solutions) if args.solutions else None
    if os.path.exists(out) and os.listdir(out):
        raise ClassroomError(f"--out {args.out}: exists and is not empty; choose a new folder")
    if sol and (sol + os.sep).startswith(out + os.sep):
        raise ClassroomError(f"--solutions {args.solutions}: must be outside the student tree {args.out}")
    parts = [find_part(name, root) for name in dict.fromkeys(args.parts)]
    points = parse_per_part(args.points, parts, "--points")
    minutes = parse_per_part(args.minutes, parts, "--minutes")
    for p in parts:
        p["points"] = points.get(p["name"], POINTS)
        p["minutes"] = minutes.get(p["name"], MINUTES.get(p["name"]))
    for f in args.tests or []:
        if not os.path.isfile(os.path.join(root, f)):
            raise ClassroomError(f"--tests {f}: no such file in {root}")
    for part in parts:                                  # every name resolves before any test runs
        for f in part["functions"]:
            body_lines(*locate(root, f))
    t0 = time.time()
    mapping, ran, broken = derive_mapping(root, parts, args.tests, args.jobs)
    for p in parts:
        if not mapping[p["name"]]:
            raise ClassroomError(f"{p['name']}: no test fails when its body is removed (ran: "
                                 f"{', '.join(ran[p['name']]) or 'no test file imports its module'}), "
                                 f"so it cannot be graded; choose another function or add a test")
    if broken:
        print(f"note: not graded, failed on the original code (as make runs it, each part's calls "
              f"traced): {tests_word(len(broken))}, "
              f"{', '.join(broken)}")
    copy_tree(root, [f for f in tracked_files(root) if f not in ANSWER_FILES], out)
    for part in parts:
        stub(out, part, hints=not args.no_hints)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    record = dict(made_from=commit, not_graded=broken,
                  parts=[dict(name=p["name"], title=p["title"], functions=p["functions"],
                              points=p["points"], tests=mapping[p["name"]]) for p in parts])
    json.dump(record, open(os.path.join(out, MAPPING), "w"), indent=1)
    write_assignment(out, parts, mapping, hints=not args.no_hints)
    if sol:
        os.makedirs(sol, exist_ok=True)
        bodies = {p["name"]: original_bodies(root, p["functions"]) for p in parts}
        json.dump(dict(made_from=commit, bodies=bodies), open(os.path.join(sol, "solutions.json"), "w"),
                  indent=1)
    for p in parts:
        print(f"{p['name']:<20} {len(mapping[p['name']]):3d} {'test ' if len(mapping[p['name']]) == 1 else 'tests'}  "
              f"{', '.join(sorted({t.split('::')[0] for t in mapping[p['name']]}))}")
    print(f"wrote {args.out} ({len(parts)} parts, mapping in {MAPPING}, ASSIGNMENT.md)"
          + (f" and {args.solutions}/solutions.json" if sol else "") + f" in {time.time() - t0:.0f} s")


def parse_per_part(text, parts, flag):
    """"rope=5,reinforce=20" -> {"rope": 5.0, "reinforce": 20.0}, every name a chosen part."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ClassroomError(f"{flag} {item}: expected part=number, e.g. {flag} rope=5,reinforce=20")
        if name.strip() not in [p["name"] for p in parts]:
            raise ClassroomError(f"{flag} {item}: {name.strip()} is not a part of this assignment")
        if out[name.strip()] <= 0:
            raise ClassroomError(f"{flag} {item}: must be positive")
    return out


def write_assignment(out, parts, mapping, hints=True):
    total_min = sum(p["minutes"] or 0 for p in parts)
    text = ["# Assignment\n",
            f"{len(parts)} parts, {sum(p['points'] for p in parts):g} points, about "
            f"{total_min / 60:.1f} hours. Implement the functions below: each raises "
            "`NotImplementedError` now. The signature and docstring of each are kept; the "
            "docstring is the specification (formula, shapes, dtypes). Each part is graded alone: "
            "when your teacher grades part X, every other part runs the reference code, so the "
            "parts can be done in any order and a part's points depend only on its own code. "
            "When you grade yourself, the other parts are yours: a failure caused by another "
            "part's stub is marked as such.\n",
            "Grade yourself at any time: `python classroom.py grade` (all parts) or "
            "`python classroom.py grade --part NAME`. Each failing test prints its assertion "
            "with the values it compared.\n"]
    for i, part in enumerate(parts, 1):
        tests = mapping[part["name"]]
        minutes = f", about {part['minutes']:g} min" if part["minutes"] else ""
        text.append(f"## {i}. {part['title']} (`{part['name']}`, {part['points']:g} points{minutes})\n")
        if part["learns"]:
            text.append(f"You implement: {part['learns']}.\n")
        if hints and HINTS.get(part["name"]):
            text.append(f"Hint: {HINTS[part['name']]}.\n")
        if part["source"]:
            text.append(f"Where it comes from: {part['source']}.\n")
        for f in part["functions"]:
            path, node = locate(out, f)
            text.append(f"### `{f}` ({os.path.relpath(path, out)}, line {node.lineno})\n")
            doc = ast.get_docstring(node)
            text.append("```\n" + doc + "\n```\n" if doc else "(no docstring: the part's sentence above "
                        "and the tests are the specification)\n")
        files = sorted({t.split("::")[0] for t in tests})
        shown = ", ".join(f"`{t.split('::', 1)[1]}`" for t in tests[:8]) + (" ..." if len(tests) > 8 else "")
        text.append(f"Graded by {tests_word(len(tests))} in {', '.join(files)}: {shown}\n\n"
                    f"    python classroom.py grade --part {part['name']}\n")
    text.append("## Last exercise: see thinking help\n\n"
                "With every part passing, train the tiny model with your own code:\n\n"
                "    python train.py\n\n"
                "Each step prints `nll_base` (the plain next-token loss), `nll_talk` (the loss "
                "after thinking) and the thoughts' mean reward: the gain from thinking is "
                "nll_base - nll_talk, and it appears as the mixing head and the thoughts learn. "
                "`python evaluate.py --ckpt out/ckpt --html thinking.html --text \"...\"` "
                "then shows, token by token, where thinking helped.\n")
    open(os.path.join(out, "ASSIGNMENT.md"), "w").write("\n".join(text))


def copy_student_tree(src, dest):
    """A copy of the student's folder to grade in; files over 1 MB (data) are linked, not copied."""
    def copy(a, b):
        return os.symlink(os.path.abspath(a), b) if os.path.getsize(a) > 2 ** 20 else shutil.copy2(a, b)
    shutil.copytree(src, dest, copy_function=copy,
                    ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".git"))


def read_solutions(folder):
    path = os.path.join(folder, "solutions.json")
    if not os.path.isfile(path):
        raise ClassroomError(f"--solutions {folder}: no solutions.json (written by make --solutions)")
    return json.load(open(path))


def load_solutions(folder, record):
    """The reference bodies of record's parts, from the solutions made with this assignment."""
    sol = read_solutions(folder)
    missing = [p["name"] for p in record["parts"] if p["name"] not in sol["bodies"]]
    if missing or sol.get("made_from") != record.get("made_from"):
        raise ClassroomError(f"--solutions {folder}: not this assignment's ("
                             + (f"no {', '.join(missing)}" if missing else
                                f"made from {sol.get('made_from')}, the assignment from {record.get('made_from')}")
                             + ")")
    return sol["bodies"]


def grade_runs(here, record, parts, bodies, timeout, jobs):
    """{"whole": results of every selected part's tests on the student's code} and, with the
    reference bodies, {part: results of its tests with every other part's reference body}."""
    scratch = tempfile.mkdtemp(prefix="classroom-grade-")
    try:
        runs = [("whole", here, [t for p in parts for t in p["tests"]])]
        for p in parts if bodies else []:
            tree = os.path.join(scratch, p["name"])
            copy_student_tree(here, tree)
            replace_bodies(tree, {f: (lambda indent, b=b: b) for q in record["parts"] if q is not p
                                  for f, b in bodies[q["name"]].items()})
            runs.append((p["name"], tree, p["tests"]))
        # test ids, not whole files: only the graded tests run (a file that fails to import
        # still reports each of them as failed: --continue-on-collection-errors)
        with ThreadPoolExecutor(jobs) as pool:
            done = pool.map(lambda r: run_tests(r[1], sorted(set(r[2])), timeout), runs)
            return {name: results for (name, _, _), results in zip(runs, done)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def score(part, results):
    failing = [(t, outcome(results, t)[1]) for t in part["tests"] if not outcome(results, t)[0]]
    passed = len(part["tests"]) - len(failing)
    return dict(passed=passed, total=len(part["tests"]),
                points=round(part["points"] * passed / len(part["tests"]), 1),
                failing=[dict(test=t, message=m) for t, m in failing])


def other_part_named(message, part, names):
    """The other part whose stub a failure message names (NotImplementedError: part: ...)."""
    for name in names:
        if name != part and f"NotImplementedError: {name}: " in message:
            return name
    return None


def cmd_grade(args):
    here = os.getcwd()
    if not os.path.isfile(os.path.join(here, MAPPING)):
        raise ClassroomError(f"{MAPPING} not found in {here}: run grade inside a folder made by "
                             f"`python classroom.py make`")
    record = json.load(open(os.path.join(here, MAPPING)))
    names = [p["name"] for p in record["parts"]]
    for p in record["parts"]:
        p.setdefault("points", record.get("points_per_part", POINTS))
    unknown = [n for n in args.part or [] if n not in names]
    if unknown:
        raise ClassroomError(f"--part {' '.join(unknown)}: not in this assignment ({', '.join(names)})")
    parts = [p for p in record["parts"] if not args.part or p["name"] in args.part]
    bodies = load_solutions(args.solutions, record) if args.solutions else None
    results = grade_runs(here, record, parts, bodies, args.timeout, args.jobs)
    rows = []
    for p in parts:
        row = dict(part=p["name"], max_points=p["points"], whole=score(p, results["whole"]))
        if bodies:
            row["alone"] = score(p, results[p["name"]])
            alone_failing = {f["test"] for f in row["alone"]["failing"]}
        for f in row["whole"]["failing"]:       # whose bug: this part's, or another's
            named = other_part_named(f["message"], p["name"], names)
            f["from_other_part"] = (f["test"] not in alone_failing) if bodies else named is not None
            f["other_part"] = named
        rows.append(row)
    kinds = ["alone", "whole"] if bodies else ["whole"]
    summary = dict(parts=rows, max_points=sum(r["max_points"] for r in rows))
    for k in kinds:
        summary[k] = dict(passed=sum(r[k]["passed"] for r in rows), total=sum(r[k]["total"] for r in rows),
                          points=round(sum(r[k]["points"] for r in rows), 1))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_grades(summary, kinds, bool(bodies))
    return 0 if all(summary[k]["passed"] == summary[k]["total"] for k in kinds) else 1


def print_grades(summary, kinds, alone):
    if alone:
        print("alone: the part on your code, every other part on the reference; "
              "whole: everything your code")
    else:
        print("whole: everything your code (the teacher grades each part alone with --solutions)")
    head = "".join(f"{k:>9} {'points':>7}" for k in kinds)
    print(f"{'part':<20}{head}  of  failures from another part")
    for r in summary["parts"]:
        cols = "".join(f"{r[k]['passed']:>4}/{r[k]['total']:<4} {r[k]['points']:>7}" for k in kinds)
        others = [f for f in r["whole"]["failing"] if f["from_other_part"]]
        named = sorted({f["other_part"] for f in others if f["other_part"]})
        note = (f"{len(others)} of {len(r['whole']['failing'])} whole failures"
                + (f" ({', '.join(named)})" if named else "")) if others else ""
        print(f"{r['part']:<20}{cols} {r['max_points']:>4}  {note}")
    cols = "".join(f"{summary[k]['passed']:>4}/{summary[k]['total']:<4} {summary[k]['points']:>7}" for k in kinds)
    print(f"{'total':<20}{cols} {summary['max_points']:>4}")
    for r in summary["parts"]:
        kind = "alone" if alone else "whole"
        own = [f for f in r[kind]["failing"] if alone or not f["from_other_part"]]
        if own:
            print(f"\n{r['part']}: {len(own)} failing" + (" on its own" if alone else ""))
        for f in own[:6]:
            print(f"  {f['test'].split('::', 1)[1]}")
            for line in f["message"].splitlines():
                print(f"      {line}")
        if len(own) > 6:
            print(f"  ... and {len(own) - 6} more (--json for all)")


def cmd_solve(args):
    bodies = read_solutions(args.solutions)["bodies"]
    for name in args.parts:
        if name not in bodies:
            raise ClassroomError(f"{name}: not in {args.solutions}/solutions.json (it has {', '.join(bodies)})")
        replace_bodies(os.getcwd(), {f: (lambda indent, b=b: b) for f, b in bodies[name].items()})
        print(f"{name}: original bodies restored")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the parts, in reading order")
    make = sub.add_parser("make", help="write an assignment of the given parts")
    make.add_argument("parts", nargs="+", help="part names from `list`, or functions like model.apply_rope")
    make.add_argument("--out", required=True, help="the student folder to create")
    make.add_argument("--solutions", help="a folder outside --out for the original bodies")
    make.add_argument("--tests", nargs="+", help="grade with these test files only "
                      "(default: the test files that import each part's module)")
    make.add_argument("--jobs", type=int, default=2, help="test runs at once (default 2)")
    make.add_argument("--points", help=f"points per part, e.g. rope=5,reinforce=20 (default {POINTS} each)")
    make.add_argument("--minutes", help="the handout's time estimate per part, e.g. rope=30")
    make.add_argument("--no_hints", action="store_true", help="leave the hints out of the "
                      "handout and the stubs' messages (the docstrings stay)")
    grade = sub.add_parser("grade", help="run the graded tests here and print the points")
    grade.add_argument("--json", action="store_true", help="print JSON for a course's grader")
    grade.add_argument("--part", nargs="+", help="grade only these parts")
    grade.add_argument("--timeout", type=int, default=3600, help="seconds before the tests are stopped")
    grade.add_argument("--solutions", help="the folder given to make --solutions (teacher): each part "
                       "is then also graded alone, every other part running its reference body")
    grade.add_argument("--jobs", type=int, default=2, help="test runs at once (default 2)")
    solve = sub.add_parser("solve", help="put the original bodies of parts back (teacher)")
    solve.add_argument("parts", nargs="+")
    solve.add_argument("--solutions", required=True, help="the folder given to make --solutions")
    args = parser.parse_args(argv)
    try:
        return dict(list=cmd_list, make=cmd_make, grade=cmd_grade, solve=cmd_solve)[args.command](args) or 0
    except ClassroomError as e:
        print(f"classroom: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
