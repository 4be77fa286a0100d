"""Watching a served model: the alerting rules of deploy/prometheus/alerts.yml evaluated without Prometheus
(promql.py: the PromQL subset; rules.py: the rule file; check.py: scrapes, the feedback store and the webhook), and
the drift report (drift.py: clusters of questions the model could not answer)."""
