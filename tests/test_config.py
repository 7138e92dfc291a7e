"""Settings from flags and environment: flags win, defaults are safe, bad values named."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from smartmob_agent.config import OPTIONS, Option, Settings, check_settings, settings_from
from smartmob_agent.errors import InvalidRequest

BY_NAME = {option.name: option for option in OPTIONS}


def test_defaults_are_loopback_8080_and_dot_smartmob() -> None:
    """With no flag and no variable, the agent listens on 127.0.0.1:8080 with state in .smartmob."""
    settings = settings_from({}, {})
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.state_dir == Path(".smartmob")
    assert settings.log_level == "info"


def test_flags_given_as_none_mean_not_given() -> None:
    """argparse's None for an absent flag leaves the default (or the variable) in place."""
    flags = {option.name: None for option in OPTIONS}
    assert settings_from(flags, {}) == Settings()
    assert settings_from(flags, {"SMARTMOB_PORT": "9000"}).port == 9000


def test_settings_are_frozen() -> None:
    """Settings cannot change once built."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]  # frozen: the write is the test


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        pytest.param("host", "0.0.0.0", "0.0.0.0", id="host"),
        pytest.param("host", "::1", "::1", id="host-ipv6"),
        pytest.param("port", "0", 0, id="port-0-picks-free"),
        pytest.param("port", "65535", 65535, id="port-max"),
        pytest.param("port", " 9000 ", 9000, id="port-with-blanks"),
        pytest.param("state_dir", "/var/lib/smartmob", Path("/var/lib/smartmob"), id="state-dir"),
        pytest.param("state_dir", "rel/dir", Path("rel/dir"), id="state-dir-relative"),
        pytest.param("stop_timeout", "2.5", 2.5, id="stop-timeout-float"),
        pytest.param("stop_timeout", "1e-3", 0.001, id="stop-timeout-exponent"),
        pytest.param("max_body", "1", 1, id="max-body"),
        pytest.param("max_download", "1048576", 1048576, id="max-download"),
        pytest.param("download_stall", "0.5", 0.5, id="download-stall"),
        pytest.param("download_timeout", "60", 60.0, id="download-timeout"),
        pytest.param("max_unpacked", "1024", 1024, id="max-unpacked"),
        pytest.param("max_members", "10", 10, id="max-members"),
        pytest.param("max_member_size", "4096", 4096, id="max-member-size"),
        pytest.param("max_ratio", "1000.5", 1000.5, id="max-ratio"),
        pytest.param("max_path_length", "255", 255, id="max-path-length"),
        pytest.param("source_allow", "Example.COM. *.internal 10.0.0.0/8 [::1]",
                     ("example.com", "*.internal", "10.0.0.0/8", "::1/128"), id="source-allow"),
        pytest.param("allow_file_sources", "/srv/releases", Path("/srv/releases"),
                     id="allow-file-sources"),
        pytest.param("log_level", "DEBUG", "debug", id="log-level-any-case"),
        pytest.param("log_level", "warning", "warning", id="log-level-warning"),
        pytest.param("log_format", "JSON", "json", id="log-format-any-case"),
        pytest.param("log_format", "kv", "kv", id="log-format-kv"),
        pytest.param("utc", "yes", True, id="utc"),
        pytest.param("logging_endpoint", "fluent://fluentd:24224/smartmob",
                     "fluent://fluentd:24224/smartmob", id="logging-endpoint"),
        pytest.param("webhook", "http://127.0.0.1:9/hook", ("http://127.0.0.1:9/hook",),
                     id="webhook"),
        pytest.param("webhook", "http://a/ https://b/", ("http://a/", "https://b/"),
                     id="webhooks-separated-by-spaces"),
        pytest.param("webhook_secret", "s3cret", "s3cret", id="webhook-secret"),
        pytest.param("monitor_interval", "0.5", 0.5, id="monitor-interval"),
        pytest.param("allow_host", "Smartmob-Agent *.example.org.",
                     ("smartmob-agent", "*.example.org"), id="allow-host"),
        pytest.param("allow_origin", "HTTPS://Dash.Example.org:443/ http://127.0.0.1:8081",
                     ("https://dash.example.org", "http://127.0.0.1:8081"), id="allow-origin"),
        pytest.param("header_timeout", "0.5", 0.5, id="header-timeout"),
        pytest.param("body_timeout", "30", 30.0, id="body-timeout"),
        pytest.param("keepalive_timeout", "1", 1.0, id="keepalive-timeout"),
        pytest.param("max_connections", "64", 64, id="max-connections"),
        pytest.param("trusted_proxy", "127.0.0.1 10.0.0.0/8 ::1 192.168.1.7/24",
                     tuple(ipaddress.ip_network(text) for text in (
                         "127.0.0.1/32", "10.0.0.0/8", "::1/128", "192.168.1.0/24")),
                     id="trusted-proxy"),
    ],
)
def test_each_option_from_flag_and_from_environment(name: str, text: str, value: Any) -> None:
    """Each option is read from its flag, or from its SMARTMOB_* variable when no flag is set."""
    option = BY_NAME[name]
    assert getattr(settings_from({name: text}, {}), name) == value
    assert getattr(settings_from({}, {option.env: text}), name) == value


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_flag_wins_over_environment(option: Option) -> None:
    """When both are given, the flag's value is used and the variable is ignored."""
    good: dict[str, tuple[str | list[str], str]] = {
        "host": ("10.0.0.1", "10.0.0.2"), "port": ("1", "2"), "state_dir": ("a", "b"),
        "stop_timeout": ("1", "2"), "build_timeout": ("1", "2"),
        "max_body": ("1", "2"), "max_download": ("1", "2"),
        "download_stall": ("1", "2"), "download_timeout": ("1", "2"),
        "max_unpacked": ("1", "2"), "max_members": ("1", "2"), "max_member_size": ("1", "2"),
        "max_ratio": ("1", "2"), "max_path_length": ("1", "2"),
        "source_allow": (["a.example"], "b.example"),
        "allow_file_sources": ("/srv/a", "/srv/b"),
        "log_level": ("error", "debug"), "log_format": ("json", "kv"),
        "utc": ("true", "false"), "logging_endpoint": ("file:///dev/stdout", "file://a"),
        "webhook": (["http://a/"], "http://b/"),
        "webhook_secret": ("s1", "s2"), "monitor_interval": ("1", "2"),
        "log_lines": ("1", "2"), "log_max_bytes": ("0", "2"), "log_files": ("0", "2"),
        "token": (["k" * 16], "e" * 16), "token_file": ("a", "b"),
        "app_token": (["web=" + "k" * 16], "web=" + "e" * 16),
        "app_tokens_file": ("a", "b"), "insecure": ("true", "false"),
        "allow_host": (["a.example"], "b.example"),
        "allow_origin": (["http://a.example"], "http://b.example"),
        "tls_cert": ("a", "b"), "tls_key": ("a", "b"),
        "user": ("nobody", "daemon"), "group": ("nogroup", "daemon"),
        "header_timeout": ("1", "2"), "body_timeout": ("1", "2"),
        "keepalive_timeout": ("1", "2"), "max_connections": ("1", "2"),
        "trusted_proxy": (["10.0.0.1"], "10.0.0.2"),
    }
    flag, env = good[option.name]
    from_both = settings_from({option.name: flag}, {option.env: env})
    assert getattr(from_both, option.name) == getattr(settings_from({option.name: flag}, {}),
                                                      option.name)
    assert getattr(from_both, option.name) != getattr(settings_from({}, {option.env: env}),
                                                      option.name)


def test_bad_variable_is_ignored_when_the_flag_is_given() -> None:
    """A flag replaces the variable entirely, so a broken variable does no harm."""
    assert settings_from({"port": "81"}, {"SMARTMOB_PORT": "nonsense"}).port == 81


def test_unrelated_environment_is_ignored() -> None:
    """Variables that are not SMARTMOB_* options do not change anything."""
    assert settings_from({}, {"PORT": "1", "HOST": "x", "smartmob_port": "2"}) == Settings()


def test_every_option_is_spelled_consistently() -> None:
    """Each option's flag and variable derive from its name, and all settings have one."""
    assert {option.name for option in OPTIONS} == {f.name for f in dataclasses.fields(Settings)}
    for option in OPTIONS:
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.env == "SMARTMOB_" + option.name.upper()
        assert option.help


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        pytest.param("port", "http", "whole number", id="port-word"),
        pytest.param("port", "", "whole number", id="port-empty"),
        pytest.param("port", "80.5", "whole number", id="port-float"),
        pytest.param("port", "-1", "0 to 65535", id="port-negative"),
        pytest.param("port", "65536", "0 to 65535", id="port-too-big"),
        pytest.param("host", "", "not empty", id="host-empty"),
        pytest.param("host", "   ", "not empty", id="host-blank"),
        pytest.param("state_dir", "", "not empty", id="state-dir-empty"),
        pytest.param("stop_timeout", "0", "positive number of seconds", id="stop-timeout-zero"),
        pytest.param("stop_timeout", "-1", "positive", id="stop-timeout-negative"),
        pytest.param("stop_timeout", "soon", "positive", id="stop-timeout-word"),
        pytest.param("stop_timeout", "nan", "positive", id="stop-timeout-nan"),
        pytest.param("stop_timeout", "inf", "positive", id="stop-timeout-inf"),
        pytest.param("download_stall", "0", "positive", id="download-stall-zero"),
        pytest.param("download_timeout", "-5", "positive", id="download-timeout-negative"),
        pytest.param("max_body", "0", "positive number of bytes", id="max-body-zero"),
        pytest.param("max_body", "1.5", "whole number", id="max-body-float"),
        pytest.param("max_body", "1MB", "whole number", id="max-body-unit"),
        pytest.param("max_download", "-1", "positive number of bytes", id="max-download-neg"),
        pytest.param("max_unpacked", "0", "positive number of bytes", id="max-unpacked-zero"),
        pytest.param("max_members", "0", "positive whole number", id="max-members-zero"),
        pytest.param("max_member_size", "1G", "whole number", id="max-member-size-unit"),
        pytest.param("max_ratio", "0.5", "at least 1", id="max-ratio-below-one"),
        pytest.param("max_ratio", "inf", "at least 1", id="max-ratio-inf"),
        pytest.param("max_path_length", "-3", "positive whole number", id="path-length-neg"),
        pytest.param("source_allow", "http://example.com/", "host name", id="allow-url"),
        pytest.param("source_allow", "*", "host name", id="allow-star"),
        pytest.param("source_allow", "2852039166", "host name", id="allow-numeric"),
        pytest.param("allow_file_sources", "releases", "absolute", id="file-sources-relative"),
        pytest.param("log_level", "loud", "debug, info, warning, error", id="log-level"),
        pytest.param("log_level", "", "debug, info, warning, error", id="log-level-empty"),
        pytest.param("log_format", "xml", "text, kv, json", id="log-format"),
        pytest.param("utc", "maybe", "true or false", id="utc"),
        pytest.param("logging_endpoint", " ", "not empty", id="logging-endpoint-empty"),
        pytest.param("header_timeout", "0", "positive", id="header-timeout-zero"),
        pytest.param("body_timeout", "inf", "positive", id="body-timeout-inf"),
        pytest.param("keepalive_timeout", "-1", "positive", id="keepalive-timeout-neg"),
        pytest.param("max_connections", "0", "positive whole number", id="max-conn-zero"),
        pytest.param("max_connections", "many", "whole number", id="max-conn-word"),
        pytest.param("trusted_proxy", "proxy.example", "an address", id="proxy-name"),
        pytest.param("trusted_proxy", "10.0.0.0/33", "a network", id="proxy-bad-cidr"),
    ],
)
def test_invalid_values_are_named(name: str, text: str, reason: str) -> None:
    """A value that cannot be used raises InvalidRequest naming the flag or variable, and why."""
    option = BY_NAME[name]
    for flags, environ, source in (
        ({name: text}, {}, option.flag),
        ({}, {option.env: text}, option.env),
    ):
        with pytest.raises(InvalidRequest) as caught:
            settings_from(flags, environ)
        assert set(caught.value.fields) == {source}
        assert f"{text!r} is not valid" in caught.value.fields[source]
        assert reason in caught.value.fields[source]
        assert str(caught.value).startswith(f"invalid configuration: {source}: ")


def test_every_invalid_value_is_named_at_once() -> None:
    """Several bad values, from flags and variables, are all reported together."""
    with pytest.raises(InvalidRequest) as caught:
        settings_from(
            {"port": "x", "stop_timeout": "0"},
            {"SMARTMOB_LOG_LEVEL": "loud", "SMARTMOB_PORT": "also ignored"},
        )
    assert set(caught.value.fields) == {"--port", "--stop-timeout", "SMARTMOB_LOG_LEVEL"}
    for source in caught.value.fields:
        assert source in str(caught.value)


def test_webhook_flag_repeats() -> None:
    """--webhook given many times (argparse's list) gives every URL, in order."""
    urls = ["http://127.0.0.1:9/a", "https://example.invalid/b"]
    assert settings_from({"webhook": urls}, {}).webhook == tuple(urls)


@pytest.mark.parametrize("url", ["ftp://x/", "http://", "hook", "http://a b/"])
def test_bad_webhook_url_is_named(url: str) -> None:
    """A webhook that is not an http(s) URL is refused with the flag named."""
    with pytest.raises(InvalidRequest) as caught:
        settings_from({"webhook": [url]}, {})
    assert "--webhook" in caught.value.fields


def test_tls_certificate_and_key_go_together() -> None:
    check_settings(settings_from({"tls_cert": "c", "tls_key": "k"}, {}))
    check_settings(settings_from({}, {}))
    for given in ({"tls_cert": "c"}, {"tls_key": "k"}):
        with pytest.raises(InvalidRequest, match="go together"):
            check_settings(settings_from(given, {}))


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("", False), ("off", False),
])
def test_a_switch_from_the_environment(text: str, value: bool) -> None:
    assert settings_from({}, {"SMARTMOB_INSECURE": text}).insecure is value
    with pytest.raises(InvalidRequest):
        settings_from({}, {"SMARTMOB_INSECURE": "maybe"})
