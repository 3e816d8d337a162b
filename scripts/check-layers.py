#!/usr/bin/env python3
"""The layering rule of docs/architecture.md, checked: a file of manager/ or shim/ may include
only headers of its own layer and of the layers below it (and the public headers). Prints every
include that breaks the rule and exits 1; prints the layers and exits 0 when none does.

    scripts/check-layers.py [SOURCE_ROOT]
"""
import pathlib
import re
import sys

# Bottom up. A layer's files may include its own headers and those of every layer before it.
LAYERS = ['base', 'config', 'backend', 'track', 'pool', 'account', 'engine', 'report', 'api', 'shim']
PUBLIC = 'manager/include'  # gpumem.h and gpumem_stats.def: any layer may include them
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def layer_of(path, root):
    rel = path.relative_to(root).as_posix()
    if rel.startswith('shim/'):
        return 'shim'
    parts = rel.split('/')
    if len(parts) >= 3 and parts[0] == 'manager' and parts[1] in LAYERS:
        return parts[1]
    return None


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent)
    sources = [p for d in ('manager', 'shim') for p in (root / d).rglob('*')
               if p.suffix in ('.c', '.h', '.def') and p.is_file()]
    headers = {}  # name -> layer (None: public)
    for p in sources:
        if p.suffix in ('.h', '.def'):
            public = p.relative_to(root).as_posix().startswith(PUBLIC + '/')
            headers.setdefault(p.name, None if public else layer_of(p, root))
    problems = []
    unplaced = []
    for p in sorted(sources):
        if p.relative_to(root).as_posix().startswith(PUBLIC + '/'):
            continue
        own = layer_of(p, root)
        if own is None:
            unplaced.append(p.relative_to(root).as_posix())
            continue
        for name in INCLUDE.findall(p.read_text(errors='replace')):
            if name not in headers:
                problems.append(f'{p.relative_to(root)}: includes "{name}", which is no header of manager/ or shim/')
                continue
            target = headers[name]
            if target is not None and LAYERS.index(target) > LAYERS.index(own):
                problems.append(f'{p.relative_to(root)} ({own}) includes "{name}" of the {target} layer above it')
    for u in unplaced:
        problems.append(f'{u}: in no layer (put it in manager/<layer>/ or shim/)')
    if problems:
        print('\n'.join(problems))
        print(f'{len(problems)} include(s) break the layering rule (docs/architecture.md): '
              'a file may include only its own layer and the layers below it: ' + ' < '.join(LAYERS))
        return 1
    print('layers hold: ' + ' < '.join(LAYERS) + f' ({len(sources)} files)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
