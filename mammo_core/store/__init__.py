"""What lives on disk: model cards (`card`), model folders and their trust (`registry`), shared file helpers
(`files`), training-run safety (`run_safety`), background jobs (`jobs`, `procs`) and the audit log
(`audit`, `audit_pg`)."""
