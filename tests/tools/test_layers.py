"""The layering rule (scripts/check-layers.py) holds for the tree, and the checker finds a break."""
import pathlib
import shutil
import subprocess
import sys
import tempfile
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKER = ROOT / 'scripts' / 'check-layers.py'


def run(root):
    return subprocess.run([sys.executable, str(CHECKER), str(root)], capture_output=True, text=True)


class Layers(unittest.TestCase):
    def test_tree_holds(self):
        r = run(ROOT)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn('layers hold', r.stdout)

    def test_an_upward_include_is_named(self):
        with tempfile.TemporaryDirectory() as tmp:
            copy = pathlib.Path(tmp)
            for d in ('manager', 'shim'):
                shutil.copytree(ROOT / d, copy / d)
            pool = copy / 'manager' / 'pool' / 'pool.c'
            pool.write_text('#include "gm_engine.h"\n' + pool.read_text())
            r = run(copy)
            self.assertEqual(r.returncode, 1, r.stdout)
            self.assertIn('manager/pool/pool.c (pool) includes "gm_engine.h" of the engine layer above it', r.stdout)

    def test_a_file_outside_the_layers_is_named(self):
        with tempfile.TemporaryDirectory() as tmp:
            copy = pathlib.Path(tmp)
            for d in ('manager', 'shim'):
                shutil.copytree(ROOT / d, copy / d)
            (copy / 'manager' / 'stray.c').write_text('int x;\n')
            r = run(copy)
            self.assertEqual(r.returncode, 1, r.stdout)
            self.assertIn('manager/stray.c: in no layer', r.stdout)


if __name__ == '__main__':
    unittest.main()
