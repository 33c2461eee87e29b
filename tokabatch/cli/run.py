"""`tokabatch run`: placeholder while the jobs modules land."""
import typer
def register(app: typer.Typer) -> None:
    pass
