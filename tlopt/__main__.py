from tlopt.cli import main

main()
