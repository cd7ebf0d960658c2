"""Found by `--fs-discover --tasks-pattern 'discovered/**/tasks_*.py'`."""

from cli_app import broker


@broker.task(task_name="discovered.beta")
async def beta() -> str:
    return "beta"
