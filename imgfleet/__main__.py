from imgfleet.cli import main

# The guard matters: the decode pool spawns processes that re-import __main__.
if __name__ == "__main__":
    raise SystemExit(main())
