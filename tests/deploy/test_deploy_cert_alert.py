"""The certificate-expiry alerts through Prometheus' own tools: `promtool check rules`
parses deploy/k8s/base/prometheusrule-certificates.yaml, `promtool test rules` replays the
gauge the processes export (services/common/security.py) and checks that
MmsearchCertificateExpiresSoon fires once a certificate is less than 7 days from expiry (and
not before), and MmsearchCertificateExpired once it has expired. Skips without promtool
(Debian/Ubuntu: `apt-get install prometheus`; CI installs it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from k8s_helpers import K8S, needs_promtool, promtool, rule_groups_file

pytestmark = needs_promtool

DAY = 86400
# What a pod exports (plus the target labels its ServiceMonitor adds).
SERIES = ('mmsearch_tls_certificate_expiry_timestamp_seconds{namespace="mmsearch", job="search", pod="search-0", '
          'role="server", file="/etc/mmsearch/tls/tls.crt"}')


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    return rule_groups_file(K8S / "base" / "prometheusrule-certificates.yaml", tmp_path / "rules.yaml")


def test_the_gauge_name_is_the_one_the_processes_export() -> None:
    from services.common.security import CERT_EXPIRY

    text = (K8S / "base" / "prometheusrule-certificates.yaml").read_text()
    assert CERT_EXPIRY._name in text and SERIES.startswith(CERT_EXPIRY._name)


def test_rules_parse(rules_file: Path) -> None:
    out = promtool("check", "rules", str(rules_file))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_fire_seven_days_before_expiry_and_at_expiry(rules_file: Path, tmp_path: Path) -> None:
    # Time starts at 0 in promtool: a certificate whose notAfter is 10 days away, never renewed.
    expiry = 10 * DAY
    labels = {"namespace": "mmsearch", "job": "search", "pod": "search-0", "role": "server",
              "file": "/etc/mmsearch/tls/tls.crt"}
    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "5m",
        "tests": [{
            "interval": "5m",  # as scraped: samples older than 5 min are stale to Prometheus
            "input_series": [{"series": SERIES, "values": f"{expiry}x3000"}],
            "alert_rule_test": [
                # 8 days left: quiet.
                {"eval_time": "48h", "alertname": "MmsearchCertificateExpiresSoon", "exp_alerts": []},
                # 6 days 23 h left, for more than 10 minutes: fires, naming the certificate.
                {"eval_time": "73h", "alertname": "MmsearchCertificateExpiresSoon", "exp_alerts": [{
                    "exp_labels": {**labels, "severity": "warning"},
                    "exp_annotations": {
                        "summary": "A TLS certificate loaded by search-0 expires in less than 7 days",
                        "description": (
                            "The server certificate /etc/mmsearch/tls/tls.crt loaded by search-0 (search) expires in "
                            "6d 23h 0m 0s, although cert-manager should have renewed it (renewBefore: 15 days in "
                            "the examples): check the Certificate's status (kubectl -n mmsearch describe "
                            "certificate), the issuer, and that the Secret mounted in the pod changed."),
                        "runbook": "docs/operations.md#certificate-rotation"},
                }]},
                {"eval_time": "73h", "alertname": "MmsearchCertificateExpired", "exp_alerts": []},
                # Expired.
                {"eval_time": "241h", "alertname": "MmsearchCertificateExpired", "exp_alerts": [{
                    "exp_labels": {**labels, "severity": "critical"},
                    "exp_annotations": {
                        "summary": "A TLS certificate loaded by search-0 has expired",
                        "description": (
                            "The server certificate /etc/mmsearch/tls/tls.crt loaded by search-0 expired; new TLS "
                            "connections to or from this pod fail. Renew it (cert-manager) or replace the Secret: "
                            "the processes pick the new files up without a restart."),
                        "runbook": "docs/operations.md#certificate-rotation"},
                }]},
            ],
        }, {
            # Renewed in time (the gauge jumps 30 days ahead at day 2): never fires.
            "interval": "5m",
            "input_series": [{"series": SERIES, "values": f"{expiry}x576 {expiry + 30 * DAY}x2500"}],
            "alert_rule_test": [
                {"eval_time": "73h", "alertname": "MmsearchCertificateExpiresSoon", "exp_alerts": []},
                {"eval_time": "241h", "alertname": "MmsearchCertificateExpired", "exp_alerts": []},
            ],
        }],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    out = promtool("test", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
