"""Shell completion of ``smartmob`` for bash and zsh, made from the command's parser.

``smartmob completion bash`` (or ``zsh``) prints a script to ``eval`` in the shell's
startup file. It completes the commands and each command's options from the parser, file
names for ``upload``, ``deploy`` and ``--file``, agent names after ``--agent`` and process slugs
where a command takes one, asking ``smartmob`` itself (the hidden ``_complete``
command, which answers within a second or says nothing).
"""

from __future__ import annotations

import argparse

#: Commands whose first argument is a process slug.
SLUG_COMMANDS = ("status", "rm", "start", "stop", "restart", "signal", "logs", "attach")
#: Commands whose argument is a file or folder.
PATH_COMMANDS = ("upload", "deploy")

_BASH = """\
# smartmob completion for bash; in ~/.bashrc: eval "$(smartmob completion bash)"
_smartmob() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local command="" word skip=""
    for word in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
        if [ -n "$skip" ]; then skip=""; continue; fi
        case "$word" in
            %(valued)s) skip=1 ;;
            -*) ;;
            *) command="$word"; break ;;
        esac
    done
    if [ "$prev" = "--agent" ]; then
        COMPREPLY=( $(compgen -W "$(smartmob _complete agents 2>/dev/null)" -- "$cur") )
        return
    fi
    if [ "$prev" = "--file" ] || [ "$prev" = "-f" ]; then
        COMPREPLY=( $(compgen -f -- "$cur") )
        return
    fi
    local options
    case "$command" in
%(cases)s
        *) options="%(common)s" ;;
    esac
    if [ -z "$command" ] && [[ "$cur" != -* ]]; then
        COMPREPLY=( $(compgen -W "%(commands)s" -- "$cur") )
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "$options" -- "$cur") )
    else
        case "$command" in
            %(path_commands)s) COMPREPLY=( $(compgen -f -- "$cur") ) ;;
            %(slug_commands)s)
                COMPREPLY=( $(compgen -W "$(smartmob _complete slugs 2>/dev/null)" -- "$cur") ) ;;
        esac
    fi
}
complete -F _smartmob smartmob
"""
_ZSH = """\
# smartmob completion for zsh; in ~/.zshrc: eval "$(smartmob completion zsh)"
autoload -U +X compinit && compinit
autoload -U +X bashcompinit && bashcompinit
"""


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings
            if action.help != argparse.SUPPRESS]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {name: sub for name, sub in action.choices.items()
                    if not name.startswith("_")}
    return {}


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script of ``shell`` (``bash`` or ``zsh``) for ``parser``."""
    commands = _subparsers(parser)
    cases = "\n".join(f'        {name}) options="{" ".join(_flags(sub))}" ;;'
                      for name, sub in commands.items())
    bash = _BASH % {
        "cases": cases, "common": " ".join(_flags(parser)),
        "commands": " ".join(commands), "path_commands": "|".join(PATH_COMMANDS),
        "slug_commands": "|".join(SLUG_COMMANDS),
        "valued": "|".join(flag for action in parser._actions if action.nargs != 0
                           for flag in action.option_strings),
    }
    return bash if shell == "bash" else _ZSH + bash
