"""Every README command that runs one of the project's scripts must get past that script's flag checks.

The shell code blocks of README.md (```bash, ```sh, ```shell or a bare ```) are read by a small shell reader:
`\\` line continuations, '...', "...", $'...' and backslash quoting, `#` comments, `;` between commands, variables
set in the same block (`COMMON="..."`, then `$COMMON` or `${COMMON}`) and `for x in a b; do ...; done` loops (the
body once per value). Each `python X.py ...` and `torchrun [--nproc_per_node N] X.py ...` found is checked the way
the script starts: `tyro.cli(module.Args, args=argv)`, then `module.check_args(args, N)` (N = 1 for plain python).
Nothing is loaded: no model, tokenizer or dataset. The reader raises on shell it does not know rather than guess.
"""

import importlib
import os
import re
import shlex
from dataclasses import dataclass

import pytest
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SHELL_LANGUAGES = {"", "bash", "sh", "shell"}
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
ASSIGNMENT = re.compile(r"([A-Za-z_]\w*)=")
ANSI_C_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "e": "\x1b",
                  "\\": "\\", "'": "'", '"': '"', "?": "?"}
UNSUPPORTED = {"if", "then", "elif", "else", "fi", "while", "until", "case", "esac", "function", "select"}
TORCHRUN_FLAGS = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path", "--module", "-m"}
# Every script of the project has at least one README command, and the README keeps at least the recipes it had
# when this test was written (13 torchrun, 22 in all), so a reader that finds nothing cannot pass.
SCRIPTS = {"ppo.py", "ppo_plus.py", "drpo.py", "rebel.py", "refuel.py", "sft.py", "reward.py", "dpo.py",
           "evaluate.py"}
MIN_TORCHRUN = 13
MIN_COMMANDS = 22


# ----------------------------------------------------------------------------------------------------------------
# A small shell reader: enough of bash for the README's recipes
# ----------------------------------------------------------------------------------------------------------------
def code_blocks(text: str):
    """Yield (line number of the first code line, code) for each fenced shell code block."""
    block, start, language = None, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        if block is None:
            fence = re.match(r"\s*```\s*([\w+-]*)\s*$", line)
            if fence:
                block, start, language = [], number + 1, fence.group(1).lower()
        elif line.strip() == "```":
            if language in SHELL_LANGUAGES:
                yield start, "\n".join(block) + "\n"
            block = None
        else:
            block.append(line)


def ansi_c(source: str, i: int) -> tuple[str, int]:
    """The text of the $'...' whose body starts at source[i], and the index after its closing quote."""
    out = []
    while source[i] != "'":
        if source[i] == "\\":
            if source[i + 1] not in ANSI_C_ESCAPES:
                raise ValueError(f"the shell reader does not know the escape \\{source[i + 1]} in $'...'")
            out.append(ANSI_C_ESCAPES[source[i + 1]])
            i += 2
        else:
            out.append(source[i])
            i += 1
    return "".join(out), i + 1


def lex(source: str, first_line: int) -> list[tuple[int, list[list[tuple[str, str]]]]]:
    """Split shell code into simple commands (line, words). A word is a list of parts: ("lit", text),
    ("var", name) (unquoted: split on whitespace when expanded) or ("qvar", name) (inside double quotes)."""
    commands, words, word = [], [], None
    line = command_line = first_line

    def start():
        nonlocal word, command_line
        if word is None:
            if not words:
                command_line = line
            word = []

    def add(kind: str, value: str):
        start()
        if kind == "lit" and word and word[-1][0] == "lit":
            word[-1] = ("lit", word[-1][1] + value)
        else:
            word.append((kind, value))

    def end_word():
        nonlocal word
        if word is not None:
            words.append(word)
        word = None

    def end_command():
        nonlocal words
        end_word()
        if words:
            commands.append((command_line, words))
        words = []

    i = 0
    while i < len(source):
        c, variable = source[i], VARIABLE.match(source, i)
        if source.startswith("\\\n", i):  # line continuation
            i, line = i + 2, line + 1
        elif c == "\n":
            end_command()
            i, line = i + 1, line + 1
        elif c in " \t":
            end_word()
            i += 1
        elif c == "#" and word is None:  # a comment, to the end of the line
            i = source.index("\n", i)
        elif source[i:i + 2] in ("&&", "||"):
            end_command()
            i += 2
        elif c in ";|&":
            end_command()
            i += 1
        elif c in "`<>(){}" and word is None or c == "`":
            raise ValueError(f"README line {line}: the shell reader does not know {c!r} (extend tests/test_readme.py)")
        elif c == "\\":
            add("lit", source[i + 1])
            i += 2
        elif c == "'":
            end = source.index("'", i + 1)
            add("lit", source[i + 1:end])
            line += source.count("\n", i, end)
            i = end + 1
        elif source.startswith("$'", i):
            text, i = ansi_c(source, i + 2)
            add("lit", text)
        elif c == '"':
            start()
            i += 1
            while source[i] != '"':
                variable = VARIABLE.match(source, i)
                if source.startswith("\\\n", i):
                    i, line = i + 2, line + 1
                elif source[i] == "\\" and source[i + 1] in '$`"\\':
                    add("lit", source[i + 1])
                    i += 2
                elif source[i] == "`" or source.startswith("$(", i):
                    raise ValueError(f"README line {line}: the shell reader does not know command substitution")
                elif variable:
                    add("qvar", variable.group(1) or variable.group(2))
                    i = variable.end()
                else:
                    line += source[i] == "\n"
                    add("lit", source[i])
                    i += 1
            i += 1
        elif source.startswith("$(", i):
            raise ValueError(f"README line {line}: the shell reader does not know command substitution")
        elif variable:
            add("var", variable.group(1) or variable.group(2))
            i = variable.end()
        else:
            add("lit", c)
            i += 1
    end_command()
    return commands


def literal(word: list[tuple[str, str]]) -> str | None:
    """The word's text when it has no variable in it."""
    return word[0][1] if len(word) == 1 and word[0][0] == "lit" else ("" if not word else None)


def expand_word(word: list[tuple[str, str]], env: dict[str, str], split: bool = True) -> list[str]:
    """The fields a word expands to: unquoted variables are split on whitespace, and fields that come only from
    such splitting are dropped when empty (as in bash)."""
    fields = [["", not word]]  # [text, kept even if empty]; a word of no parts is the empty quoted string ""
    for kind, value in word:
        if kind == "lit":
            fields[-1][0] += value
            fields[-1][1] = True
            continue
        if value not in env:
            raise KeyError(f"${value} is not set in this code block")
        if kind == "qvar" or not split:
            fields[-1][0] += env[value]
            fields[-1][1] = True
        else:
            pieces = re.split(r"[ \t\n]+", env[value])
            fields[-1][0] += pieces[0]
            fields += [[piece, False] for piece in pieces[1:]]
    return [text for text, keep in fields if text or keep]


def expand(words, env: dict[str, str]) -> list[str]:
    return [field for word in words for field in expand_word(word, env)]


def assignment(word, env: dict[str, str]) -> tuple[str, str] | None:
    """(name, value) when the word is NAME=value."""
    match = word and word[0][0] == "lit" and ASSIGNMENT.match(word[0][1])
    if not match:
        return None
    rest = ([("lit", word[0][1][match.end():])] if match.end() < len(word[0][1]) else []) + word[1:]
    return match.group(1), "".join(expand_word(rest, env, split=False))


@dataclass
class Command:
    line: int
    launcher: str  # "python" or "torchrun"
    script: str
    argv: list[str]
    nproc: int

    @property
    def id(self) -> str:
        return f"README line {self.line}: {self.script}"

    def __str__(self) -> str:
        launcher = ["torchrun", "--nproc_per_node", str(self.nproc)] if self.launcher == "torchrun" else ["python"]
        return shlex.join(launcher + [self.script] + self.argv)


def script_command(line: int, words: list[str]) -> Command | None:
    """The Command when `words` run a .py script under python or torchrun, else None."""
    launcher, rest, nproc = os.path.basename(words[0]), words[1:], 1
    if launcher in ("python", "python3"):
        while rest and rest[0].startswith("-"):
            if rest[0] in ("-m", "-c"):  # a module (pytest, pip, ...) or inline code, not a script
                return None
            rest = rest[2:] if rest[0] in ("-X", "-W") else rest[1:]
        launcher = "python"
    elif launcher == "torchrun":
        while rest and rest[0].startswith("-"):
            option, has_value, value = rest[0].partition("=")
            if option in TORCHRUN_FLAGS:
                if option in ("-m", "--module", "--no-python", "--no_python"):
                    return None
                rest = rest[1:]
                continue
            if not has_value:
                value, rest = rest[1], rest[1:]
            rest = rest[1:]
            if option in ("--nproc_per_node", "--nproc-per-node"):
                nproc = int(value)  # "gpu" or "auto" would not say how many: fail loudly
    else:
        return None
    if not rest or not rest[0].endswith(".py"):
        return None
    return Command(line, launcher, rest[0], rest[1:], nproc)


def run(commands, env: dict[str, str], found: list[Command]):
    """Walk the block's commands as bash would, recording the script commands with their expanded arguments."""
    i = 0
    while i < len(commands):
        line, words = commands[i]
        head = literal(words[0])
        if head in UNSUPPORTED or head in ("do", "done"):
            raise ValueError(f"README line {line}: the shell reader does not know {head!r} here")
        if head == "for":
            if len(words) < 3 or literal(words[2]) != "in":
                raise ValueError(f"README line {line}: only `for NAME in WORDS; do ...; done` is understood")
            name, values = literal(words[1]), expand(words[3:], env)
            body, depth, i = [], 0, i + 1
            while True:
                if i == len(commands):
                    raise ValueError(f"README line {line}: the for loop has no `done`")
                keyword = literal(commands[i][1][0])
                depth += keyword == "for"
                if keyword == "done" and depth == 0:
                    break
                depth -= keyword == "done"
                body.append(commands[i])
                i += 1
            if not body or literal(body[0][1][0]) != "do":
                raise ValueError(f"README line {line}: the for loop has no `do`")
            body[0] = (body[0][0], body[0][1][1:])
            body = [(body_line, body_words) for body_line, body_words in body if body_words]
            for value in values:
                run(body, {**env, name: value}, found)
            i += 1
            continue
        local = dict(env)
        while words and assignment(words[0], local):
            key, value = assignment(words[0], local)
            local[key] = value
            words = words[1:]
        if not words:  # NAME=value alone sets a shell variable
            env.update(local)
        else:
            command = script_command(line, expand(words, local))
            if command is not None:
                found.append(command)
        i += 1


def readme_commands(path: str = README) -> list[Command]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = []
    for start, code in code_blocks(text):
        run(lex(code, start), {}, found)
    return found


COMMANDS = readme_commands()


# ----------------------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------------------
def test_shell_reader():
    """The reader on the shapes the README uses: continuations, variables, loops, quoting and comments."""
    code = ('X="--a 1 \\\n  --b 2"   # comment; not a command\n'
            "torchrun --nproc_per_node=4 ppo.py $X --c \"$X\" --d ${X}x \\\n  --e $'p\\n{q}' 'lit $X'\n"
            "for algo in ppo rebel; do\n  python $algo.py --out runs/$algo\ndone  # loop\n"
            "python -m pytest -q tests\npip install foo; python3 -u sft.py --f\n")
    found = []
    run(lex(code, 10), {}, found)
    assert [(c.line, c.launcher, c.script, c.nproc) for c in found] == [
        (12, "torchrun", "ppo.py", 4), (15, "python", "ppo.py", 1), (15, "python", "rebel.py", 1),
        (18, "python", "sft.py", 1)]
    assert found[0].argv == ["--a", "1", "--b", "2", "--c", "--a 1   --b 2", "--d", "--a", "1", "--b", "2x",
                             "--e", "p\n{q}", "lit $X"]
    assert [c.argv for c in found[1:]] == [["--out", "runs/ppo"], ["--out", "runs/rebel"], ["--f"]]
    with pytest.raises(KeyError):
        run(lex("python ppo.py $UNSET\n", 1), {}, [])


def test_readme_commands_found():
    torchrun = [c for c in COMMANDS if c.launcher == "torchrun"]
    assert len(torchrun) >= MIN_TORCHRUN, f"found only {len(torchrun)} torchrun commands in README.md"
    assert len(COMMANDS) >= MIN_COMMANDS, f"found only {len(COMMANDS)} script commands in README.md"
    missing = SCRIPTS - {c.script for c in COMMANDS}
    assert not missing, f"no README command runs {sorted(missing)}"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_passes_check_args(command: Command, capsys, monkeypatch, tmp_path):
    """The flags parse as the script parses them, and check_args accepts them for the command's process count.

    It runs in an empty temporary folder, so relative paths (--output-dir runs/...) are judged the same wherever
    the checkout is, and nothing could ever land in the repository."""
    monkeypatch.chdir(tmp_path)
    assert os.path.isfile(os.path.join(ROOT, command.script)), f"{command.id}: there is no script {command.script}"
    module = importlib.import_module(command.script[:-len(".py")].replace("/", "."))  # bench/x.py: bench.x
    failure = None
    try:
        args = tyro.cli(module.Args, args=command.argv)
    except SystemExit as e:
        output = capsys.readouterr()
        failure = f"the flags do not parse (exit {e.code}):\n{(output.err or output.out)[-3000:]}"
    if failure is None and hasattr(module, "check_args"):  # the bench scripts check nothing more than tyro does
        try:
            module.check_args(args, command.nproc)
        except SystemExit as e:
            failure = f"check_args on {command.nproc} process(es): {e.code}"
    if failure is not None:  # failed here, outside the except blocks, so the report is not a chain of tracebacks
        pytest.fail(f"{command.id}: {failure}\n  {command}", pytrace=False)
