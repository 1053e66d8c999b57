from sdqkd.cli import main

main()
