"""Sizes, durations, CPU shares and paths as written in policy files."""

from __future__ import annotations

import math

import pytest

from agentd.policy.paths import (
    check_worker_path,
    exec_entry_covers,
    is_at_or_below,
    matching_exec_entry,
    normalise_exec_entry,
    normalise_path,
)
from agentd.policy.sizes import (
    format_duration,
    format_size,
    parse_cpu,
    parse_duration,
    parse_size,
)


class TestParseSize:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (65536, 65536),
            ("1024", 1024),
            ("1B", 1),
            ("1KiB", 1024),
            ("512MiB", 512 << 20),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("1kB", 1000),
            ("5MB", 5_000_000),
            ("3GB", 3_000_000_000),
            ("1TB", 10**12),
            ("1.5GiB", 3 << 29),
            ("512 MiB", 512 << 20),
        ],
    )
    def test_accepts(self, text: int | str, expected: int) -> None:
        """Bytes as an int, or a number with one of the nine units, give exact bytes."""
        assert parse_size(text) == expected

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("12 parsecs", "unknown unit 'parsecs'"),
            ("1mb", "units are case-sensitive (write MB)"),
            ("1gib", "units are case-sensitive (write GiB)"),
            ("512M", "ambiguous; write MiB (2^20) or MB (10^6)"),
            ("1Gi", "write GiB, with the B"),
            ("-5MiB", "is negative"),
            (0, "must be more than zero"),
            ("0KiB", "must be more than zero"),
            (-1, "must be more than zero"),
            ("1.3B", "not a whole number of bytes"),
            (1.5, "is not a size"),
            (True, "is not a size"),
            ("", "is not a size"),
            ("lots", "is not a size"),
            (1 << 63, "larger than the kernel accepts"),
        ],
    )
    def test_rejects(self, value: object, message: str) -> None:
        """Unknown or miscased units, negatives, zero and fractions of a byte are refused."""
        with pytest.raises(ValueError) as info:
            parse_size(value)
        assert message in str(info.value)
        assert "use a size like 512MiB" in str(info.value) or "kernel" in str(info.value)


class TestParseDuration:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (30, 30.0),
            (0.25, 0.25),
            ("90", 90.0),
            ("250ms", 0.25),
            ("60s", 60.0),
            ("5m", 300.0),
            ("1h", 3600.0),
            ("1.5h", 5400.0),
            ("720h", 30 * 24 * 3600.0),
        ],
    )
    def test_accepts(self, value: float | str, expected: float) -> None:
        """Seconds as a number, or one number with ms, s, m or h, give seconds."""
        assert parse_duration(value) == expected

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("1h30m", "write 90m rather than 1h30m"),
            ("5d", "unknown unit 'd'"),
            ("-5s", "is negative"),
            (0, "must be more than zero"),
            ("0ms", "must be more than zero"),
            (-1, "must be more than zero"),
            (math.nan, "not a finite duration"),
            (math.inf, "not a finite duration"),
            (True, "is not a duration"),
            ("soon", "is not a duration"),
            ("721h", "longer than 30 days"),
        ],
    )
    def test_rejects(self, value: object, message: str) -> None:
        """Compound, unknown-unit, non-positive and non-finite durations are refused."""
        with pytest.raises(ValueError) as info:
            parse_duration(value)
        assert message in str(info.value)


class TestParseCpu:
    @pytest.mark.parametrize(("value", "expected"), [(0.5, 0.5), (2, 2.0), (1.0, 1.0)])
    def test_accepts(self, value: float, expected: float) -> None:
        """A positive number of cores, whole or fractional, is accepted as a float."""
        assert parse_cpu(value) == expected

    @pytest.mark.parametrize("value", [0, -1, "1", True, math.nan, math.inf, 5000])
    def test_rejects(self, value: object) -> None:
        """Zero, negatives, strings, booleans, non-finite and absurd core counts are refused."""
        with pytest.raises(ValueError, match="cores"):
            parse_cpu(value)


class TestFormat:
    @pytest.mark.parametrize(
        ("n", "text"),
        [(512 << 20, "512MiB"), (1 << 30, "1GiB"), (1000, "1kB"), (1023, "1023B"), (1, "1B")],
    )
    def test_format_size(self, n: int, text: str) -> None:
        """Byte counts are written exactly, in the largest unit that divides them."""
        assert format_size(n) == text
        assert parse_size(text) == n

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [(300.0, "5m"), (3600.0, "1h"), (0.25, "250ms"), (90.0, "90s"), (1.5, "1500ms")],
    )
    def test_format_duration(self, seconds: float, text: str) -> None:
        """Durations are written exactly, in the largest unit that divides them."""
        assert format_duration(seconds) == text
        assert parse_duration(text) == seconds


class TestPaths:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [("/usr/", "/usr"), ("//usr//lib/./", "/usr/lib"), ("/", "/"), ("/etc/ssl", "/etc/ssl")],
    )
    def test_normalise_path(self, value: str, expected: str) -> None:
        """Host paths are normalised and lose any trailing slash."""
        assert normalise_path(value) == expected

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("/usr/lib/git-core/", "/usr/lib/git-core/"),
            ("/usr//bin/", "/usr/bin/"),
            ("/usr/bin/python3", "/usr/bin/python3"),
            ("/", "/"),
        ],
    )
    def test_exec_entry_keeps_tree_slash(self, value: str, expected: str) -> None:
        """Exec entries keep the trailing slash that makes them a tree."""
        assert normalise_exec_entry(value) == expected

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("usr/bin", "is not absolute"),
            ("/usr/../etc", "contains '..'"),
            ("/usr/\0bin", "NUL or control character"),
            ("/usr/\nbin", "NUL or control character"),
            ("", "empty path"),
            (3, "is not a path"),
        ],
    )
    def test_rejects(self, value: object, message: str) -> None:
        """Relative paths, '..', NUL and control characters are refused, not repaired."""
        with pytest.raises(ValueError) as info:
            normalise_path(value)
        assert message in str(info.value)

    @pytest.mark.parametrize(
        ("path", "root", "inside"),
        [
            ("/usr/lib", "/usr", True),
            ("/usr", "/usr", True),
            ("/usrx", "/usr", False),
            ("/etc", "/usr", False),
            ("/anything", "/", True),
        ],
    )
    def test_is_at_or_below(self, path: str, root: str, inside: bool) -> None:
        """Containment is by whole path components, never by string prefix alone."""
        assert is_at_or_below(path, root) is inside

    @pytest.mark.parametrize(
        ("entry", "target", "covered"),
        [
            ("/usr/bin/", "/usr/bin/cat", True),
            ("/usr/bin/", "/usr/bin/x/", True),
            ("/usr/bin/", "/usr/binx", False),
            ("/usr/lib/", "/usr/libexec/tool", False),
            ("/bin/sh", "/bin/sh", True),
            ("/bin/sh", "/bin/shell", False),
            ("/bin/sh", "/bin/sh/", False),
        ],
    )
    def test_exec_entry_covers(self, entry: str, target: str, covered: bool) -> None:
        """A tree entry covers what is below it; a file entry covers only itself."""
        assert exec_entry_covers(entry, target) is covered

    def test_matching_exec_entry(self) -> None:
        """The first entry that allows an executable is returned, or None."""
        entries = ("/usr/bin/python3", "/usr/lib/")
        assert matching_exec_entry(entries, "/usr/lib/git-core/git") == "/usr/lib/"
        assert matching_exec_entry(entries, "/usr/bin/python3.11") is None

    @pytest.mark.parametrize(
        ("value", "problem"),
        [
            ("/workspace", None),
            ("workspace", "is not absolute"),
            ("/workspace/", "is not normalised; write '/workspace'"),
            ("/tmp/../etc", "is not normalised"),
            ("", "is empty"),
            ("/tmp/\0", "NUL byte"),
        ],
    )
    def test_check_worker_path(self, value: str, problem: str | None) -> None:
        """Request paths must already be absolute and normalised; the reason says how."""
        found = check_worker_path(value, "cwd")
        if problem is None:
            assert found is None
        else:
            assert found is not None
            assert problem in found
