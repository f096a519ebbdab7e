"""The built-in workloads that configs name by `_target_`: models (`models`, torch) and datasets (`datasets`,
numpy only, so the launcher can check their files before anything is submitted)."""
