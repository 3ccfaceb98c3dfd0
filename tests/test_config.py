"""Unit tests of the daemon's configuration file (agentd.config): pure, no daemon, no root.

Every test writes a tiny TOML file into a temporary directory and loads it with
`load_config`, the one function the daemon and `agentd --check` use.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

import pytest

from agentd.config import Config, load_config
from agentd.errors import InvalidArgument


def write(tmp_path: Path, text: str, name: str = "agentd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refusal(tmp_path: Path, text: str) -> str:
    """Loads `text` as a config file, expects InvalidArgument and returns its message."""
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), f"the message does not name the file: {message}"
    assert "\n" not in message, f"the message is not one line: {message!r}"
    return message


class TestDefaults:
    def test_empty_file_gives_the_documented_defaults(self, tmp_path: Path) -> None:
        """An empty config is valid and keeps the system-wide default locations."""
        config = load_config(write(tmp_path, ""))
        assert config.daemon.state_dir == Path("/var/lib/agentd")
        assert config.daemon.runtime_dir == Path("/run/agentd")
        assert config.daemon.policy_dir == Path("/etc/agentd/policies")
        assert config.daemon.worker_uid == 65534
        assert config.agents == {}

    def test_role_sockets_live_in_the_runtime_dir(self, tmp_path: Path) -> None:
        """Each role gets its own socket under runtime_dir, the client's being agentd.sock."""
        config = load_config(write(tmp_path, '[daemon]\nruntime_dir = "/run/x"\n'))
        assert config.role_sockets() == {
            "client": Path("/run/x/agentd.sock"),
            "approver": Path("/run/x/agentd-approver.sock"),
            "admin": Path("/run/x/agentd-admin.sock"),
        }
        assert config.socket_path == Path("/run/x/agentd.sock")

    def test_config_is_frozen(self, tmp_path: Path) -> None:
        """A loaded config cannot be changed by accident after validation."""
        config = load_config(write(tmp_path, ""))
        with pytest.raises(ValueError, match="frozen"):
            config.daemon.worker_uid = 0  # type: ignore[misc]


class TestUnknownKeys:
    def test_unknown_top_level_key_is_refused(self, tmp_path: Path) -> None:
        """A key outside [daemon] and [agents] is an error naming the key, never ignored."""
        message = refusal(tmp_path, "deamon = 1\n")
        assert "deamon" in message

    def test_unknown_daemon_key_is_refused(self, tmp_path: Path) -> None:
        """A misspelt daemon key names its dotted path in the message."""
        message = refusal(tmp_path, '[daemon]\nstate_dri = "state"\n')
        assert "daemon.state_dri" in message

    def test_unknown_agent_key_is_refused(self, tmp_path: Path) -> None:
        """A misspelt key of an agent's section names the agent and the key."""
        message = refusal(tmp_path, '[agents.web]\npolicy = "web.yaml"\nstgae = "pilot"\n')
        assert "agents.web.stgae" in message


class TestTypes:
    @pytest.mark.parametrize(("text", "field"), [
        ('[daemon]\nworker_uid = "nobody"\n', "daemon.worker_uid"),
        ("[daemon]\nstate_dir = 5\n", "daemon.state_dir"),
        ('[daemon]\nlog_format = "xml"\n', "daemon.log_format"),
        ('[daemon]\nlog_level = "verbose"\n', "daemon.log_level"),
        ('[daemon]\ncgroup_backend = "v3"\n', "daemon.cgroup_backend"),
        ("[daemon]\ndrain_seconds = -1\n", "daemon.drain_seconds"),
        ("[daemon]\ntree_head_interval = 0\n", "daemon.tree_head_interval"),
        ("[daemon]\nmax_concurrent_workers = 0\n", "daemon.max_concurrent_workers"),
        ("agents = 5\n", "agents"),
        ('[agents.web]\nstage = "pilot"\n', "agents.web.policy"),
    ])
    def test_bad_value_is_refused_naming_the_field(self, tmp_path: Path, text: str,
                                                   field: str) -> None:
        """A value of the wrong type or out of range is refused with its dotted field."""
        assert field in refusal(tmp_path, text)

    def test_worker_uid_zero_is_refused(self, tmp_path: Path) -> None:
        """Tools never run as root: worker_uid 0 is an error, not a quiet privilege grant."""
        assert "daemon.worker_uid" in refusal(tmp_path, "[daemon]\nworker_uid = 0\n")

    @pytest.mark.parametrize(("text", "field"), [
        ("[daemon]\nworker_uid = true\n", "daemon.worker_uid"),
        ('[daemon]\nworker_uid = "1000"\n', "daemon.worker_uid"),
        ('[daemon]\ndrain_seconds = "5"\n', "daemon.drain_seconds"),
        ("[daemon]\nmax_concurrent_workers = 2.0\n", "daemon.max_concurrent_workers"),
    ])
    def test_value_of_another_toml_type_is_not_coerced(self, tmp_path: Path, text: str,
                                                       field: str) -> None:
        """TOML values are typed: a bool or a string where a number belongs is refused."""
        assert field in refusal(tmp_path, text)

    def test_unknown_stage_is_refused(self, tmp_path: Path) -> None:
        """An agent's stage must be one of the four stages; the message lists them."""
        message = refusal(tmp_path, '[agents.web]\npolicy = "web.yaml"\nstage = "prod"\n')
        assert "agents.web.stage" in message
        assert "production" in message

    def test_bad_agent_name_is_refused(self, tmp_path: Path) -> None:
        """Agent names are lower-case slugs; anything else is refused with the name."""
        assert "'Web_1'" in refusal(tmp_path, '[agents.Web_1]\npolicy = "web.yaml"\n')

    def test_every_cgroup_backend_probe_knows_can_be_pinned(self, tmp_path: Path) -> None:
        """cgroup_backend accepts "hybrid", which agentd.sandbox.cgroups.probe() offers."""
        config = load_config(write(tmp_path, '[daemon]\ncgroup_backend = "hybrid"\n'))
        assert config.daemon.cgroup_backend == "hybrid"


class TestFiles:
    def test_missing_file_is_named(self, tmp_path: Path) -> None:
        """A config path that does not exist is InvalidArgument naming the path."""
        path = tmp_path / "nope.toml"
        with pytest.raises(InvalidArgument, match=r"nope\.toml: config file not found"):
            load_config(path)

    def test_toml_syntax_error_names_file_and_line(self, tmp_path: Path) -> None:
        """Broken TOML is InvalidArgument naming the file and the line of the error."""
        message = refusal(tmp_path, '[daemon]\nstate_dir = "a"\n[agents\n')
        assert "line 3" in message


class TestPaths:
    def test_relative_paths_are_resolved_against_the_config_dir(self, tmp_path: Path) -> None:
        """state_dir, runtime_dir and policy_dir are relative to the config file, not the cwd."""
        (tmp_path / "etc").mkdir()
        path = write(tmp_path / "etc", '[daemon]\nstate_dir = "state"\n'
                     'runtime_dir = "../run"\npolicy_dir = "policies"\n')
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        previous = Path.cwd()
        os.chdir(elsewhere)
        try:
            config = load_config(Path("..") / "etc" / "agentd.toml")
        finally:
            os.chdir(previous)
        base = path.resolve().parent
        assert config.daemon.state_dir == base / "state"
        assert config.daemon.runtime_dir == tmp_path.resolve() / "run"
        assert config.daemon.policy_dir == base / "policies"
        assert all(p.is_absolute() for p in (config.daemon.state_dir, config.daemon.runtime_dir,
                                             config.daemon.policy_dir))

    def test_absolute_paths_are_kept(self, tmp_path: Path) -> None:
        """An absolute path stays exactly what was written."""
        config = load_config(write(tmp_path, '[daemon]\nstate_dir = "/srv/agentd"\n'))
        assert config.daemon.state_dir == Path("/srv/agentd")

    def test_stages_file_is_relative_to_the_policy_dir(self, tmp_path: Path) -> None:
        """stages_file stays a name inside policy_dir (it is not resolved against the config)."""
        config = load_config(write(tmp_path, '[daemon]\npolicy_dir = "p"\n'
                                   'stages_file = "ceilings.yaml"\n'))
        assert config.daemon.policy_dir / config.daemon.stages_file == \
            tmp_path.resolve() / "p" / "ceilings.yaml"


class TestGroups:
    def test_nonexistent_socket_group_is_refused(self, tmp_path: Path) -> None:
        """A socket_group that does not exist on the host is refused, saying how to fix it."""
        message = refusal(tmp_path, '[daemon]\nsocket_group = "no-such-group-agentd-test"\n')
        assert "daemon.socket_group" in message
        assert "no-such-group-agentd-test" in message
        assert "does not exist" in message

    def test_nonexistent_approver_group_is_refused(self, tmp_path: Path) -> None:
        """approver_group is checked the same way as socket_group."""
        message = refusal(tmp_path, '[daemon]\napprover_group = "no-such-group-agentd-test"\n')
        assert "daemon.approver_group" in message

    def test_existing_group_is_accepted(self, tmp_path: Path) -> None:
        """A group that exists (root's, which every host has) is accepted as given."""
        name = grp.getgrgid(0).gr_name
        config = load_config(write(tmp_path, f'[daemon]\nsocket_group = "{name}"\n'))
        assert config.daemon.socket_group == name


class TestAgents:
    def test_agents_are_loaded_with_their_stage(self, tmp_path: Path) -> None:
        """Each [agents.NAME] section becomes an agent with its policy file and stage."""
        config = load_config(write(tmp_path, '[agents.web]\npolicy = "web.yaml"\n'
                                   '[agents.cve-triage]\npolicy = "cve.yaml"\nstage = "pilot"\n'))
        assert set(config.agents) == {"web", "cve-triage"}
        assert config.agents["web"].stage == "prototype"
        assert config.agents["cve-triage"].stage == "pilot"
        assert config.agents["cve-triage"].policy == "cve.yaml"
        assert isinstance(config, Config)
