from distill.commands import main

main()
