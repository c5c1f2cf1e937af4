from sharedcompute._worker._main import main

main()
