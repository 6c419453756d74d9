"""`python -m services.search`: the public search API."""
from services.common.server import run
from services.search.app import SearchService
from services.search.settings import SearchSettings

if __name__ == "__main__":
    settings = SearchSettings()
    run(settings, lambda: SearchService(settings).app())
