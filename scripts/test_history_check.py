#!/usr/bin/env python3
"""The history checker finds what it claims to find (python3 -m unittest scripts/test_history_check.py)."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from history_check import check  # noqa: E402


def w(key, value, invoke, complete, result="ok"):
    return {"process": "p", "type": "write", "key": key, "value": value,
            "invoke": invoke, "complete": complete, "result": result}


def r(key, value, invoke, complete, result="ok"):
    return {"process": "q", "type": "read", "key": key, "value": value,
            "invoke": invoke, "complete": complete, "result": result}


class HistoryCheck(unittest.TestCase):
    def violations(self, ops):
        return check(ops)[1]

    def test_a_sequential_history_holds(self):
        self.assertEqual(self.violations([r("k", None, 0, 1), w("k", "a", 1, 2), r("k", "a", 3, 4),
                                          w("k", "b", 5, 6), r("k", "b", 7, 8)]), [])

    def test_a_read_concurrent_with_a_write_may_see_either_value(self):
        ops = [w("k", "a", 0, 1), w("k", "b", 2, 5), r("k", "a", 3, 4), r("k", "b", 3, 4)]
        self.assertEqual(self.violations(ops), [])

    def test_a_value_never_written_is_found(self):
        self.assertEqual(len(self.violations([w("k", "a", 0, 1), r("k", "zz", 2, 3)])), 1)

    def test_a_stale_read_is_found(self):
        ops = [w("k", "a", 0, 1), w("k", "b", 2, 3), r("k", "a", 4, 5)]
        self.assertEqual(len(self.violations(ops)), 1)

    def test_a_lost_acknowledged_write_is_found(self):
        self.assertEqual(len(self.violations([w("k", "a", 0, 1), r("k", None, 2, 3)])), 1)

    def test_a_failed_write_must_not_show(self):
        self.assertEqual(len(self.violations([w("k", "a", 0, 1, "fail"), r("k", "a", 2, 3)])), 1)

    def test_an_unknown_write_may_show_late_and_never_makes_a_read_stale(self):
        ops = [w("k", "a", 0, 1, "unknown"), w("k", "b", 2, 3), r("k", "a", 4, 5), w("k", "c", 6, 7, "unknown"),
               r("k", "b", 8, 9)]
        self.assertEqual(self.violations(ops), [])

    def test_a_read_of_a_write_not_yet_begun_is_found(self):
        self.assertEqual(len(self.violations([r("k", "a", 0, 1), w("k", "a", 2, 3, "unknown")])), 1)


if __name__ == "__main__":
    unittest.main()
